#!/usr/bin/env bash
# Pack DEST/gem-results into DEST/NAME-HHMMSS.tgz and remove the folder: one archive per script
# run carries every result file (easy to copy off a GPU machine), named so that a
# second script in the same call does not overwrite it (a call cut by its time limit never
# gets here and returns what fits of the folder instead).
#   usage: bash benchmarks/gpu/pack.sh DEST NAME
dest=${1:?usage: pack.sh DEST NAME} name=${2:?usage: pack.sh DEST NAME}
ls -R "$dest/gem-results" | head -40
tar czf "$dest/$name-$(date +%H%M%S).tgz" -C "$dest" gem-results && rm -rf "$dest/gem-results" && ls -l "$dest"
