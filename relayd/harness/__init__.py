"""The Harness Feature Flags protocol family."""
