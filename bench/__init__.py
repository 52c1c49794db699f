"""`python -m bench`: this project's runtime against transformers on a full-width PaliGemma 2 (see README "Performance")."""
