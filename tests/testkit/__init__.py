"""Fixtures the test folders share. They belong to the tests: the package (core, hosts, nodes, the
`sd-accel` command) never imports them, and the tests take no fixtures from the command."""
