"""HTTP routes of the registry, one module per resource. Every route name must have a rule in
``server.auth.ACCESS_RULES``."""
