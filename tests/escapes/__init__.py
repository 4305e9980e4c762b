"""The escape corpus: code an attacker who owns a contained service would run, each act
asserted to fail (with the errno the containment should give) and to leave the host unchanged.

- attack.py: the prelude of every attack script (`@attempt("name")`, `syscall`, `spawn`), the
  `Contained` service (`.attack(script, params)` runs a script inside with `corral exec` and
  returns {name: {"outcome": "EPERM" | ... | "returned", ...}}) and checks of the host's state.
- conftest.py: one sample service for the whole package (its watcher set to `react = "log"`,
  so every attempt meets the preventive layers and none is cut short by a revert).
- test_filesystem.py, test_kernel.py, test_network.py, test_resources.py, test_neighbours.py:
  one attack script per module, run once; one test (or parameter) per attempt.

To add an attempt: write it in the module's ATTACK as an `@attempt("name")` function doing the
act, then a test asserting `blocked(attacked, "name", "EXPECTED_ERRNO")` and whatever on the
host the act would have changed. An attempt that succeeds is a hole: keep the test, mark it
`xfail(strict=True, reason="HOLE: ...")`.

A package (with this file) so that its conftest and modules get their own names
(`escapes.conftest`, `escapes.test_*`) while `import conftest` still finds tests/conftest.py."""
