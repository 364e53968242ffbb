# Sourced by run.sh and test.sh: create .venv and (re)install the project into it when needed.
# usage: ensure_venv EXTRAS "MODULES THAT MUST IMPORT"    (EXTRAS: "" or "[dev]")
# Reinstalls when a module does not import, or pyproject.toml or setup.py is newer than the
# last install (the install is editable: source edits need no reinstall).
ensure_venv() {
  local extras=$1 mods=$2
  local marker=".venv/.installed${extras:+-dev}"
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  if ! .venv/bin/python -c "import ${mods// /, }" 2>/dev/null || [ ! -e "$marker" ] \
     || [ -n "$(find pyproject.toml setup.py -newer "$marker" -print -quit)" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
    touch "$marker"
  fi
}
