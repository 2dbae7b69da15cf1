# Shared helpers for Tabby's scripts; source it, don't run it.

# Prints a progress line.
step() { printf '\n==> %s\n' "$*"; }

# Fails unless running as root.
need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$(basename "$0"): run me as root" >&2
        exit 1
    fi
}

# Puts cargo on PATH: the machine's Rust toolchain comes from rustup, which
# lives in the invoking user's home (also under sudo).
find_cargo() {
    command -v cargo >/dev/null 2>&1 && return 0
    local home
    for home in "${CARGO_HOME:-}" "$HOME/.cargo" /root/.cargo \
        ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo"}; do
        if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
            export PATH="$home/bin:$PATH" CARGO_HOME="$home"
            if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$(dirname "$home")/.rustup" ]; then
                export RUSTUP_HOME="$(dirname "$home")/.rustup"
            fi
            return 0
        fi
    done
    cat >&2 <<'MSG'
cargo not found. Tabby needs a Rust toolchain >= 1.85 from rustup
(Debian 12's rustc is too old): install rustup for root, then re-run.
MSG
    exit 1
}
