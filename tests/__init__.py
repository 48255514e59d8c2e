"""The test suite, a package rooted at the repository: helpers are imported as
``tests.support.<helper>`` or relatively within a folder (tests/README.md)."""
