"""The LaunchDarkly protocol family."""
