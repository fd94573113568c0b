"""producer_sdk."""
