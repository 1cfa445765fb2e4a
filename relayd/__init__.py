"""relayd: a feature-flag relay daemon for Harness and LaunchDarkly SDKs."""

__version__ = "0.1.0"
