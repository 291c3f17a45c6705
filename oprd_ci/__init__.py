"""oprd_ci package."""
