#!/bin/bash
# The inside of deploy/vm-test: runs as root in the booted Debian VM, from the host's share (mounted
# at /mnt/host, holding the .deb). It installs the relay the way docs/OPERATIONS.md says, runs the
# simulators of both peers as transient units, and checks the units for real. Each check appends
# one "PASS name (detail)" or "FAIL name (detail)" line to /mnt/host/results; the host prints them.
# Diagnostics (systemctl status of the failure cases, the journal) go to /mnt/host/diag/.
set -u
share=/mnt/host
results="$share/results"
diag="$share/diag"
mkdir -p "$diag"
: >"$results"
etc=/etc/opensim-chat-relay
# Secrets drawn at run time: 24 hex digits from the kernel's random source.
random_secret() { od -An -N12 -tx1 /dev/urandom | tr -d ' \n'; }
# A password that appears nowhere but in the password files and the simulated CMS's account.
relay_secret="$(random_secret)"
# The simulated CMS's second user (who types in the CMS in the two-region check).
dora_secret="$(random_secret)"

result() { # STATUS NAME DETAIL
    printf '%s %s (%s)\n' "$1" "$2" "$3" | tee -a "$results"
}
check() { # NAME DETAIL CONDITION...: PASS when the command succeeds
    local name="$1" detail="$2"
    shift 2
    if "$@"; then result PASS "$name" "$detail"; else result FAIL "$name" "$detail"; fi
}
# Waits up to $1 seconds for a command to succeed.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}
prop() { systemctl show -P "$2" "$1"; }
status_of() { curl -fs --max-time 5 "http://127.0.0.1:$1/status"; }
field() { status_of "$1" | jq -r "$2"; }
now_ms() { date +%s%3N; }
listening() { ss -Htln "sport = :$1" | grep -q .; }

# A simulator as a transient unit. The description hides the command line (with the password) from
# the journal's "Started ..." line.
sim() { # UNIT ARGS...
    local unit="$1"
    shift
    systemd-run --quiet --unit="$unit" --description="simulator $unit" -p Type=exec \
        /usr/bin/opensim-chat-relay sim "$@"
}
sim_cms() { sim "sim-cms-$1" cms --listen "127.0.0.1:$2" --user "chatrelay:$relay_secret" "${@:3}"; }
sim_viewer() { # NAME PORT CHATTER [REGION]
    sim "sim-viewer-$1" viewer --listen "127.0.0.1:$2" --timezone UTC --chatter "$3" ${4:+--region "$4"}
}
# The chat rows the simulated CMS stored, one "hello #N from NAME" text a line.
cms_rows() { journalctl -q -o cat -u "sim-cms-$1.service" | sed -n 's/^chat [0-9]* grid .*fromCMS 0: .*\(hello #[0-9]* from .*\)$/\1/p'; }

# An instance configured as docs/OPERATIONS.md says: the example copied and filled in, the password
# in its own root-only file.
configure() { # NAME VIEWER_PORT CMS_PORT HTTP_PORT [CONFIG_FILE]
    local file="${5:-$etc/$1.toml}"
    sed -e "s|127.0.0.1:9144|127.0.0.1:$2|g" \
        -e "s|http://192.0.2.10/|http://127.0.0.1:$3/|" \
        -e "s|127.0.0.1:9188|127.0.0.1:$4|" \
        "$etc/example.toml" >"$file"
    # Quick retries: a restarted CMS is reached within seconds, not after the default 60 s cap.
    printf '\n[retry]\nmax = "2s"\n' >>"$file"
}
# An instance for the regions of a simulator, from example-regions.toml: its two regions' viewers
# (Welcome, Sandbox) on their own ports.
configure_regions() { # NAME WELCOME_PORT SANDBOX_PORT CMS_PORT HTTP_PORT
    sed -e "s|127.0.0.1:9144|127.0.0.1:$2|g" \
        -e "s|127.0.0.1:9145|127.0.0.1:$3|g" \
        -e "s|http://192.0.2.10/|http://127.0.0.1:$4/|" \
        -e "s|127.0.0.1:9188|127.0.0.1:$5|" \
        "$etc/example-regions.toml" >"$etc/$1.toml"
    printf '\n[retry]\nmax = "2s"\n' >>"$etc/$1.toml"
}
set_password() { # FILE
    install -m 0600 /dev/null "$1"
    printf '%s\n' "$relay_secret" >"$1"
}

echo "== guest: installing the package"
deb="$(ls "$share"/opensim-chat-relay_*.deb)"
cp "$deb" /root/
cd /root || exit 1
if apt-get install -y -q "./$(basename "$deb")" >"$diag/apt.txt" 2>&1 \
    && [ -x /usr/bin/opensim-chat-relay ] && [ -f "$etc/example.toml" ] && [ -f "$etc/example-regions.toml" ] \
    && systemctl cat opensim-chat-relay.service opensim-chat-relay@.service >/dev/null \
    && [ -f /usr/share/doc/opensim-chat-relay/OPERATIONS.md ]; then
    result PASS package-installs "apt install ./$(basename "$deb"): binary, both units, $etc/example.toml and example-regions.toml, docs"
else
    result FAIL package-installs "see diag/apt.txt"
    tail -20 "$diag/apt.txt"
    exit 1
fi

# The failure cases start first, so that their "no restart" waits overlap the other checks.
configure badconfig 9150 8090 9198
sed -i 's|^base_url = .*|base_url = "not a url"|' "$etc/badconfig.toml"
set_password "$etc/badconfig.password"
systemctl start opensim-chat-relay@badconfig >/dev/null 2>&1
configure nopassword 9151 8091 9199
systemctl start opensim-chat-relay@nopassword >/dev/null 2>&1
failures_started=$SECONDS

echo "== guest: one instance of the template (opensim-chat-relay@welcome)"
sim_cms welcome 8080
sim_viewer welcome 9144 4
configure welcome 9144 8080 9188
set_password "$etc/welcome.password"
wait_for 20 listening 8080 && wait_for 20 listening 9144
if RELAY__CMS__PASSWORD_FILE="$etc/welcome.password" opensim-chat-relay check --config "$etc/welcome.toml" >"$diag/check.txt" 2>&1; then
    result PASS check-command "opensim-chat-relay check passes against the simulators"
else
    result FAIL check-command "$(grep -m1 FAIL "$diag/check.txt")"
fi

started=$(now_ms)
systemctl enable --now opensim-chat-relay@welcome 2>"$diag/enable-welcome.txt"
rc=$?
took=$(($(now_ms) - started))
state="$(prop opensim-chat-relay@welcome ActiveState)/$(prop opensim-chat-relay@welcome SubState)"
main_start=$(prop opensim-chat-relay@welcome ExecMainStartTimestampMonotonic)
active_at=$(prop opensim-chat-relay@welcome ActiveEnterTimestampMonotonic)
healthz_now="$(curl -fsS --max-time 2 http://127.0.0.1:9188/healthz)"
check start-after-ready "systemctl returned $rc after ${took} ms, $state, Type=$(prop opensim-chat-relay@welcome Type), READY=1 $(((active_at - main_start) / 1000)) ms after exec, /healthz at once: '$healthz_now'" \
    test "$rc" = 0 -a "$state" = active/running -a "$(prop opensim-chat-relay@welcome Type)" = notify \
    -a "$active_at" -gt "$main_start" -a "$healthz_now" = ok

status_text="$(prop opensim-chat-relay@welcome StatusText)"
check status-text "StatusText '$status_text'" test "$status_text" = "relaying chat"

ready() { curl -fs -o /dev/null --max-time 2 http://127.0.0.1:9188/readyz; }
wait_for 40 ready
answer() { curl -s --max-time 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:9188$1"; }
healthz="$(answer /healthz) $(curl -s --max-time 2 http://127.0.0.1:9188/healthz)"
readyz="$(answer /readyz) $(curl -s --max-time 2 http://127.0.0.1:9188/readyz | jq -cS '[.ready, (.checks | map_values(.ok))]')"
check healthz-readyz "/healthz $healthz, /readyz $readyz" \
    test "$healthz" = "200 ok" -a "$readyz" = '200 [true,{"cms":true,"delivery":true,"outbox":true,"stages":true,"viewer":true}]'

# The image's HEALTHCHECK command, against the running relay and against a port nothing listens on.
probe() { RELAY__CMS__PASSWORD_FILE="$etc/welcome.password" opensim-chat-relay healthcheck --config "$etc/welcome.toml" >/dev/null 2>&1; }
probe
probe_up=$?
RELAY__HTTP__LISTEN=127.0.0.1:9197 probe
probe_down=$?
check healthcheck-command "opensim-chat-relay healthcheck: $probe_up against the relay, $probe_down against a port nothing listens on" \
    test "$probe_up" = 0 -a "$probe_down" != 0

delivered() { [ "$(cms_rows welcome | wc -l)" -ge "$1" ]; }
wait_for 40 delivered 5
check chat-end-to-end "$(cms_rows welcome | wc -l) chatter lines stored in the simulated CMS, first '$(cms_rows welcome | head -1)'" \
    delivered 5

pid=$(prop opensim-chat-relay@welcome MainPID)
cred="/run/credentials/opensim-chat-relay@welcome.service/cms-password"
leaks=""
grep -qF "$relay_secret" "/proc/$pid/environ" && leaks+=" environment"
grep -qF "$relay_secret" "/proc/$pid/cmdline" && leaks+=" command-line"
systemctl show opensim-chat-relay@welcome | grep -qF "$relay_secret" && leaks+=" unit-properties"
# Every field of every journal entry, but the command line of the simulated CMS's own entries: it
# is given the account on its command line.
journalctl -b -o export | grep -v '^_CMDLINE=/usr/bin/opensim-chat-relay sim cms ' |
    grep -qF "$relay_secret" && leaks+=" journal"
status_of 9188 | grep -qF "$relay_secret" && leaks+=" /status"
curl -fsS --max-time 5 http://127.0.0.1:9188/metrics | grep -qF "$relay_secret" && leaks+=" /metrics"
setpriv --reuid=65534 --regid=65534 --clear-groups cat "$cred" >/dev/null 2>&1 && leaks+=" readable-by-nobody"
relay_reads=no
setpriv --reuid="$(stat -c %u "/proc/$pid")" --regid="$(stat -c %g "/proc/$pid")" --clear-groups cat "$cred" 2>/dev/null |
    grep -qxF "$relay_secret" && relay_reads=yes
env_file="$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^RELAY__CMS__PASSWORD_FILE=//p')"
login="$(field 9188 .cms.login)"
check credential "CMS login $login with the password from $env_file (relay uid reads it: $relay_reads); found in:${leaks:- nothing else (environment, command line, unit properties, journal, /status, /metrics, user nobody)}" \
    test "$login" = valid -a "$env_file" = "$cred" -a "$relay_reads" = yes -a -z "$leaks"

uid=$(stat -c %u "/proc/$pid")
user="$(id -nu "$uid" 2>/dev/null)"
link="$(readlink /var/lib/opensim-chat-relay-welcome)"
owner="$(stat -c '%u %a' /var/lib/private/opensim-chat-relay-welcome 2>/dev/null)"
outbox_dir="$(find /var/lib/private/opensim-chat-relay-welcome/outbox -maxdepth 0 -type d 2>/dev/null)"
check dynamic-user-state-directory "uid $uid ($user), /var/lib/opensim-chat-relay-welcome -> $link, owner and mode '$owner', outbox ${outbox_dir:-missing}" \
    test "$uid" -ge 61184 -a "$uid" -le 65519 -a "$link" = private/opensim-chat-relay-welcome \
    -a "$owner" = "$uid 700" -a -n "$outbox_dir"

echo "== guest: the single-region unit beside the template's instance"
sim_cms single 8081
sim_viewer single 9145 4
configure relay 9145 8081 9189
set_password "$etc/cms.password"
systemctl enable --now opensim-chat-relay 2>"$diag/enable-single.txt"
single_rc=$?
single_delivered() { [ "$(cms_rows single | wc -l)" -ge 3 ]; }
wait_for 40 single_delivered
# The other order: the template's instance starts again after the single-region unit ran.
systemctl restart opensim-chat-relay@welcome
welcome_rc=$?
n_before=$(cms_rows welcome | wc -l)
more_welcome() { [ "$(cms_rows welcome | wc -l)" -gt "$n_before" ]; }
wait_for 40 more_welcome
both="$(prop opensim-chat-relay ActiveState)/$(prop opensim-chat-relay@welcome ActiveState)"
check single-and-template-side-by-side "start $single_rc, restart $welcome_rc, both $both, NRestarts $(prop opensim-chat-relay NRestarts)/$(prop opensim-chat-relay@welcome NRestarts), /var/lib/opensim-chat-relay -> $(readlink /var/lib/opensim-chat-relay), $(cms_rows single | wc -l) and $(cms_rows welcome | wc -l) lines delivered" \
    test "$single_rc" = 0 -a "$welcome_rc" = 0 -a "$both" = active/active \
    -a "$(readlink /var/lib/opensim-chat-relay)" = private/opensim-chat-relay \
    -a "$(prop opensim-chat-relay NRestarts)" = 0 -a "$(cms_rows single | wc -l)" -ge 3 -a "$(cms_rows welcome | wc -l)" -gt "$n_before"

started=$(now_ms)
systemctl stop opensim-chat-relay
stop_rc=$?
took=$(($(now_ms) - started))
check stop-clean "systemctl stop returned $stop_rc after $took ms, Result=$(prop opensim-chat-relay Result), exit status $(prop opensim-chat-relay ExecMainStatus)" \
    test "$stop_rc" = 0 -a "$took" -lt 20000 -a "$(prop opensim-chat-relay Result)" = success \
    -a "$(prop opensim-chat-relay ExecMainStatus)" = 0

echo "== guest: the outbox across a restart, with lines pending"
# The CMS of this instance is not started yet: every line stays in the outbox.
sim_viewer pending 9146 5
configure pending 9146 8082 9190
set_password "$etc/pending.password"
systemctl start opensim-chat-relay@pending
pending_lines() { field 9190 .outbox.lines 2>/dev/null; }
enough_pending() { [ "$(pending_lines)" -ge 8 ] 2>/dev/null; }
wait_for 40 enough_pending
# No more chat, then one more poll round so that everything handed out is stored.
systemctl stop sim-viewer-pending
sleep 2
n_pending=$(pending_lines)
systemctl restart opensim-chat-relay@pending
restart_rc=$?
n_after=$(pending_lines)
sim_cms pending 8082
drained() { [ "$(pending_lines)" = 0 ]; }
wait_for 60 drained
rows="$(cms_rows pending | sed 's/^hello #\([0-9]*\) .*/\1/' | sort -n)"
expected="$(seq 1 "$n_pending")"
check outbox-survives-restart "$n_pending lines pending before the restart (rc $restart_rc), $n_after after it, $(echo "$rows" | grep -c .) delivered once the CMS came up, numbered $(echo "$rows" | head -1)..$(echo "$rows" | tail -1)" \
    test "$n_pending" -gt 0 -a "$n_after" = "$n_pending" -a "$rows" = "$expected"

echo "== guest: stop with a chat POST hanging"
sim_cms hang 8083 --hang-next 1000
sim_viewer hang 9147 4
configure hang 9147 8083 9191
set_password "$etc/hang.password"
systemctl start opensim-chat-relay@hang
posting() { [ "$(field 9191 .cms.login)" = valid ] && [ "$(field 9191 .lines.relayed)" -ge 1 ]; }
wait_for 40 posting
sleep 3
in_flight="relayed $(field 9191 .lines.relayed), delivered $(field 9191 .lines.delivered), $(ss -Htn state established '( dport = :8083 )' | wc -l) connection(s) to the CMS"
started=$(now_ms)
systemctl stop opensim-chat-relay@hang
stop_rc=$?
took=$(($(now_ms) - started))
check stop-with-post-hanging "$in_flight; systemctl stop returned $stop_rc after $took ms (the relay's own grace 9 s; TimeoutStopSec 90 s), Result=$(prop opensim-chat-relay@hang Result), exit status $(prop opensim-chat-relay@hang ExecMainStatus)" \
    test "$stop_rc" = 0 -a "$took" -lt 20000 -a "$(prop opensim-chat-relay@hang Result)" = success \
    -a "$(prop opensim-chat-relay@hang ExecMainStatus)" = 0

echo "== guest: one relay for two regions (opensim-chat-relay@simulator, two [[regions]])"
# Each region's viewer logged in to its own region, chatting; one CMS with a second account, a CMS
# user who types a line in the CMS.
sim_cms regions 8084 --user "dora:$dora_secret"
sim_viewer regions-welcome 9148 2 Welcome
sim_viewer regions-sandbox 9149 2 Sandbox
configure_regions simulator 9148 9149 8084 9192
set_password "$etc/simulator.password"
wait_for 20 listening 8084 && wait_for 20 listening 9148 && wait_for 20 listening 9149
if RELAY__CMS__PASSWORD_FILE="$etc/simulator.password" opensim-chat-relay check --config "$etc/simulator.toml" >"$diag/check-regions.txt" 2>&1; then
    result PASS two-regions-check-command "opensim-chat-relay check passes for a configuration with two [[regions]]"
else
    result FAIL two-regions-check-command "$(grep -m1 FAIL "$diag/check-regions.txt")"
fi
systemctl start opensim-chat-relay@simulator
regions_rc=$?
regions_ready() { curl -fs -o /dev/null --max-time 2 http://127.0.0.1:9192/readyz; }
wait_for 40 regions_ready
readyz_regions="$(curl -s --max-time 2 -w ' %{http_code}' http://127.0.0.1:9192/readyz)"
check two-regions-ready "systemctl start returned $regions_rc, $(prop opensim-chat-relay@simulator ActiveState)/$(prop opensim-chat-relay@simulator SubState), /readyz: $readyz_regions" \
    test "$regions_rc" = 0 -a "$(prop opensim-chat-relay@simulator SubState)" = running -a "${readyz_regions##* }" = 200

# cms.anonymous_format of example-regions.toml names the region in each row of an unmapped speaker
# (every chatter avatar here): "[Carol Visitor in Sandbox] hello #3 from Carol Visitor".
region_rows() { # REGION
    journalctl -q -o cat -u sim-cms-regions.service | grep -c "fromCMS 0: \[[A-Za-z ]* in $1\] hello #[0-9]* from "
}
relayed_metric() { # REGION: lines_relayed_total of that region's label
    curl -fs --max-time 5 http://127.0.0.1:9192/metrics |
        sed -n "s/^opensim_chat_relay_lines_relayed_total{.*region=\"$1\".*} \([0-9]*\).*/\1/p" | head -1
}
both_delivered() { [ "$(region_rows Welcome)" -ge 4 ] && [ "$(region_rows Sandbox)" -ge 4 ]; }
wait_for 60 both_delivered
welcome_metric="$(relayed_metric Welcome)"
sandbox_metric="$(relayed_metric Sandbox)"
check two-regions-to-cms "rows stored naming Welcome: $(region_rows Welcome), naming Sandbox: $(region_rows Sandbox); lines_relayed_total{region} Welcome ${welcome_metric:-none}, Sandbox ${sandbox_metric:-none}; first '$(journalctl -q -o cat -u sim-cms-regions.service | grep -m1 -o 'fromCMS 0: .*')'" \
    test "$(region_rows Welcome)" -ge 4 -a "$(region_rows Sandbox)" -ge 4 \
    -a "${welcome_metric:-0}" -ge 1 -a "${sandbox_metric:-0}" -ge 1

# Dora types a line in the CMS (the API's own POST with fromCMS 1, as the CMS's chat page does).
dora_id="$(journalctl -q -o cat -u sim-cms-regions.service | sed -n 's/^user \([0-9]*\) "dora" .*/\1/p' | head -1)"
cms_api=http://127.0.0.1:8084/OpenSim-CMS/api
dora_session="$(curl -fsS --max-time 5 -d "username=dora&password=$dora_secret" "$cms_api/auth/username/" | jq -r .token)"
typed="typed-in-the-cms-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
typed_rc=0
curl -fsS --max-time 5 -o "$diag/cms-post.txt" -H 'Content-Type: application/json' \
    -d "{\"userId\":${dora_id:-0},\"message\":\"$typed\",\"timestamp\":$(date +%s),\"fromCMS\":1}" \
    "$cms_api/grid/1/chats/?token=$dora_session" || typed_rc=$?
heard_in() { # VIEWER: how often it said the typed line in-world
    journalctl -q -o cat -u "sim-viewer-$1.service" | grep -c "^said in-world: .*$typed"
}
heard_in_both() { [ "$(heard_in regions-welcome)" -ge 1 ] && [ "$(heard_in regions-sandbox)" -ge 1 ]; }
wait_for 40 heard_in_both
# Two more in-world reads (inworld.poll_interval, 2 s): a second saying would show by then.
sleep 5
check two-regions-in-world "dora (user ${dora_id:-?}) typed '$typed' in the CMS (POST exit $typed_rc); said in Welcome $(heard_in regions-welcome) time(s), in Sandbox $(heard_in regions-sandbox) time(s)" \
    test "$typed_rc" = 0 -a "$(heard_in regions-welcome)" = 1 -a "$(heard_in regions-sandbox)" = 1
systemctl stop opensim-chat-relay@simulator

echo "== guest: the watchdog (SIGSTOP)"
pid=$(prop opensim-chat-relay@welcome MainPID)
restarts=$(prop opensim-chat-relay@welcome NRestarts)
stopped_at=$SECONDS
kill -STOP "$pid"
restarted() {
    [ "$(prop opensim-chat-relay@welcome NRestarts)" -gt "$restarts" ] &&
        [ "$(prop opensim-chat-relay@welcome ActiveState)" = active ] &&
        [ "$(prop opensim-chat-relay@welcome MainPID)" != "$pid" ]
}
wait_for 90 restarted
took=$((SECONDS - stopped_at))
journalctl -q -o cat -u opensim-chat-relay@welcome.service >"$diag/journal-welcome.txt"
timeout_logged=no
grep -q 'Watchdog timeout' "$diag/journal-welcome.txt" && timeout_logged=yes
check watchdog-restart "SIGSTOP to $pid: restarted after ${took} s as $(prop opensim-chat-relay@welcome MainPID), 'Watchdog timeout' logged: $timeout_logged" \
    restarted

echo "== guest: failures that must not loop"
# Both were started at the beginning; give a restart loop (RestartSec=5s) time to show.
sleep $((failures_started + 15 - SECONDS > 0 ? failures_started + 15 - SECONDS : 0))
systemctl status --no-pager opensim-chat-relay@badconfig >"$diag/status-badconfig.txt" 2>&1
systemctl status --no-pager opensim-chat-relay@nopassword >"$diag/status-nopassword.txt" 2>&1
for name in badconfig nopassword; do
    eval "${name}_state=\"\$(prop opensim-chat-relay@$name ActiveState) status=\$(prop opensim-chat-relay@$name ExecMainStatus) NRestarts=\$(prop opensim-chat-relay@$name NRestarts)\""
done
# shellcheck disable=SC2154 # set by the eval above
check exit-78-not-restarted "$(( SECONDS - failures_started )) s after the start: $badconfig_state" \
    test "$badconfig_state" = "failed status=78 NRestarts=0"
# shellcheck disable=SC2154
check missing-credential-not-restarted "$(( SECONDS - failures_started )) s after the start: $nopassword_state" \
    test "$nopassword_state" = "failed status=243 NRestarts=0"

echo "== guest: systemd-analyze security"
scores=""
worst=0
for unit in opensim-chat-relay.service opensim-chat-relay@welcome.service; do
    score="$(systemd-analyze security --no-pager "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')"
    scores+="$unit ${score:-?}; "
    worst="$(printf '%s\n%s\n' "$worst" "${score:-99}" | sort -g | tail -1)"
done
check security-exposure "${scores%; }; limit 2.0" awk -v w="$worst" 'BEGIN { exit !(w <= 2.0) }'

journalctl -b --no-pager >"$diag/journal.txt" 2>&1
echo "DONE" >>"$results"
