# shellcheck shell=bash
# Sourced by the launch and tpu_scripts scripts: print commands exactly, so that
# --dry-run output can be pasted into a shell.

# One argument, single-quoted only when a shell needs it (--flag='value').
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A whole command on one line.
show() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s\n' "$out"
}
