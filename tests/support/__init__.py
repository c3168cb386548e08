"""Helpers shared by the test suites (control plane, test kubelet, fixtures data)."""
