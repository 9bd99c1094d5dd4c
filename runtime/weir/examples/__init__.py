"""Example jobs and user functions: the demo's manifest and process functions the tests and users share."""
