# Keep this file tiny: twistd imports every plugin module while listing sub-commands,
# and importing the reactor here would break `twistd --reactor=...`.
from twisted.application.service import ServiceMaker

relayd = ServiceMaker(
    "relayd",
    "relayd.tap",
    "Feature-flag relay for Harness Feature Flags and LaunchDarkly SDKs.",
    "relayd",
)
