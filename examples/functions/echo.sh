#!/bin/sh
# An `exec` runtime in POSIX sh (dash, busybox ash): any executable that
# speaks the runtime pipe protocol can be a function. See
# guest-agent/runtimes/README.md.
#
# Answers every event with itself as the JSON result (so it expects JSON
# events), with no stdout or stderr.
#
# fd 3: the request pipe (EVENT <n> <timeout_ms>\n + n bytes)
# fd 4: the response pipe (READY, then RESULT <status> <len> <out> <err>\n + bytes)

printf 'READY 2\n{}' >&4 || exit 1

# `read` consumes the header line byte by byte (a shell never reads a pipe
# past the newline), and head -c copies the body straight to the response
# pipe: no shell variable holds it (one could not hold NUL bytes or
# trailing newlines). The agent sends the next EVENT only after a RESULT,
# so a head that reads ahead (busybox uses stdio) finds nothing extra.
while IFS=' ' read -r word length timeout_ms <&3; do
    if [ "$word" != EVENT ]; then
        echo "echo.sh: bad request header: $word" >&2
        exit 1
    fi
    case $length in
    '' | *[!0-9]*)
        echo "echo.sh: bad event length: $length" >&2
        exit 1
        ;;
    esac
    printf 'RESULT json %s 0 0\n' "$length" >&4 || exit 1
    head -c "$length" <&3 >&4 || exit 1
done
