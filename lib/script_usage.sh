# Print the header comment of a pipeline script as its help text. Sourced by demo.sh and the
# three stage scripts, which call it for -h or --help.
#   print_usage SCRIPT: the comment lines after the shebang, up to the first line that is not
#                       a comment, without their leading "# ".
print_usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}
