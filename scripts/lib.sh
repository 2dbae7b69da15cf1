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

# Prints the summary of a `cargo test` run: the failed tests, the skipped
# ones, and `N passed, N failed, N skipped`. $1 is cargo's output, $2 the
# TABBY_SKIP_LOG the tests appended to, $3 cargo's exit status. A skipped
# test returned early, so libtest counted it as passed: it is moved from
# passed to skipped. Returns non-zero when anything failed.
test_summary() {
    local log="$1" skiplog="$2" status="$3" passed failed ignored skipped
    # Sum cargo's "test result:" lines over every test binary.
    read -r passed failed ignored < <(awk '
        /^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i+1) ~ /^passed;?$/)  p += $i
                if ($(i+1) ~ /^failed;?$/)  f += $i
                if ($(i+1) ~ /^ignored;?$/) g += $i
            }
        }
        END { printf "%d %d %d\n", p, f, g }' "$log")
    skipped=0
    if [ -s "$skiplog" ]; then
        skipped=$(grep -c '^SKIP ' "$skiplog" || true)
    fi
    if grep -qE '^test .* \.\.\. FAILED$' "$log"; then
        echo "failed tests:"
        grep -E '^test .* \.\.\. FAILED$' "$log" | sed 's/^test /  /; s/ \.\.\. FAILED$//'
    fi
    if [ "$skipped" -gt 0 ]; then
        echo "skipped tests:"
        sed 's/^SKIP /  /' "$skiplog"
    fi
    if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
        echo "cargo test exited with $status (a build error or a crashed test binary)"
        failed=1
    fi
    [ "$ignored" -gt 0 ] && echo "($ignored ignored: child-process entry points and opt-in tests)"
    echo "$((passed - skipped)) passed, $failed failed, $skipped skipped"
    [ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
}
