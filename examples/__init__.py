"""Examples of using producer_sdk."""
