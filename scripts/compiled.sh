# Sourced by bench.sh: a second venv, .venv-compiled, with the engine's hot path compiled by
# mypyc (CONVEYOR_COMPILE=1, a non-editable install: the compiled modules and the sources they
# were built from are installed together, so the build can never be stale). Rebuilt when an
# engine source or the build files are newer than the last build.
ensure_compiled_venv() {
  local marker=".venv-compiled/.installed"
  [ -x .venv-compiled/bin/python ] || "${PYTHON:-python3}" -m venv .venv-compiled
  if [ ! -e "$marker" ] || [ -n "$(find pyproject.toml setup.py engine simulators \
        \( -name '*.py' -o -name '*.toml' \) -newer "$marker" -print -quit)" ]; then
    # the dependencies first, then the compiled engine over them: a ".[dev]" install after
    # it would rebuild the project without CONVEYOR_COMPILE and replace the compiled modules;
    # setuptools' build/ is removed first (it would copy a stale extension into the install)
    .venv-compiled/bin/python -m pip install -q --disable-pip-version-check ".[dev]" \
      && rm -rf build \
      && CONVEYOR_COMPILE=1 .venv-compiled/bin/python -m pip install -q \
           --disable-pip-version-check --force-reinstall --no-deps . \
      && touch "$marker"
  fi
}
