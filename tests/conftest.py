"""Fixtures shared by every test directory: the real servers live in `harness`."""

pytest_plugins = ["harness.fixtures", "harness.kube", "harness.helm"]
