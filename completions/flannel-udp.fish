function __flannel-udp_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __flannel-udp_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __flannel-udp_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __flannel-udp_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __flannel-udp_parse_tokens -S
    set -l unparsed_tokens (__flannel-udp_tokens -pc)
    switch $unparsed_tokens[1]
    case 'flannel-udp'
        __flannel-udp_parse_subcommand 0 'version' 'h/help'
        switch $unparsed_tokens[1]
        case 'up'
            __flannel-udp_parse_subcommand 0 'network=' 'subnet=' 'etcd-endpoints=' 'etcd-prefix=' 'etcd-username=' 'etcd-password=' 'etcd-password-file=' 'etcd-cafile=' 'etcd-certfile=' 'etcd-keyfile=' 'iface=' 'public-ip=' 'port=' 'mtu=' 'device=' 'peers=' 'subnet-file=' 'ip-masq' 'masq-backend=' 'masq-resync=' 'peer-check=' 'no-offload' 'codel-target=' 'express-size=' 'express-spin=' 'express-priority=' 'workers=' 'metrics-addr=' 'detach' 'replace' 'log-file=' 'v/verbose' 'version' 'h/help'
        case 'down'
            __flannel-udp_parse_subcommand 0 'device=' 'keep-lease' 'timeout=' 'version' 'h/help'
        case 'route'
            __flannel-udp_parse_subcommand 0 'version' 'h/help'
            switch $unparsed_tokens[1]
            case 'add'
                __flannel-udp_parse_subcommand 3 'device=' 'version' 'h/help'
            case 'del'
                __flannel-udp_parse_subcommand 1 'device=' 'version' 'h/help'
            case 'list'
                __flannel-udp_parse_subcommand 0 'device=' 'json' 'version' 'h/help'
            end
        case 'status'
            __flannel-udp_parse_subcommand 0 'device=' 'json' 'version' 'h/help'
        case 'cleanup'
            __flannel-udp_parse_subcommand 0 'network=' 'subnet=' 'subnet-file=' 'fix-cni0' 'dry-run' 'version' 'h/help'
        case 'help'
            __flannel-udp_parse_subcommand -r 1 'version'
        end
    end
end

function __flannel-udp_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __flannel-udp_parse_subcommand -S -a positional_count
    argparse -s r -- $argv
    set -l option_specs $argv[2..]
    set -l is_repeating_positional $_flag_r
    set -el _flag_r
    set -a commands $unparsed_tokens[1]
    set positional_index 0
    while true
        set -e unparsed_tokens[1]
        argparse -sn "$commands" $option_specs -- $unparsed_tokens 2> /dev/null
        set unparsed_tokens $argv
        set positional_index (math $positional_index + 1)
        for non_repeating_flag_or_option in $non_repeating_flags_or_options
            if set -ql "_flag_$(string replace -a - _ -- $non_repeating_flag_or_option)"
                set non_repeating_flags_or_options_absent 1
                break
            end
        end
        test (count $unparsed_tokens) -eq 0 -o \( -z "$is_repeating_positional" -a "$positional_index" -gt "$positional_count" \) && break
    end
end

function __flannel-udp_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __flannel-udp_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__flannel-udp_tokens -p)
    if test -z "$(__flannel-udp_tokens -t)"
        set -l index (count (__flannel-udp_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'flannel-udp' -f
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp" -eq 1' -fa 'up' -d 'Bring the node up and forward overlay traffic until stopped.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp" -eq 1' -fa 'down' -d 'Stop the daemon of a device and remove everything it made.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp" -eq 1' -fa 'route' -d 'Change or show the running daemon\'s peer table.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp" -eq 1' -fa 'status' -d 'Show the device, the overlay route and the daemon\'s state and counters.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp" -eq 1' -fa 'cleanup' -d 'Remove what an earlier flannel backend left inside the overlay network.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp" -eq 1' -fa 'help' -d 'Show subcommand help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" network' -l 'network' -d 'The whole overlay network, e.g. 10.244.0.0/16 (not with --etcd-endpoints).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" subnet' -l 'subnet' -d 'This node\'s subnet inside the network, e.g. 10.244.1.0/24 (not with --etcd-endpoints).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-endpoints' -l 'etcd-endpoints' -d 'Comma-separated etcd URLs; the network and this node\'s subnet then come from flannel\'s registry there.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-prefix' -l 'etcd-prefix' -d 'The registry\'s key prefix.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-username' -l 'etcd-username' -d 'etcd user name.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-password' -l 'etcd-password' -d 'etcd password; every local user can read it in ps until \'up\' starts: prefer --etcd-password-file or $FLANNEL_UDP_ETCD_PASSWORD.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-password-file' -l 'etcd-password-file' -d 'A file holding the etcd password (one trailing newline ignored): a regular file owned by root, mode 600 or stricter.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-cafile' -l 'etcd-cafile' -d 'CA certificate for etcd\'s TLS.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-certfile' -l 'etcd-certfile' -d 'Client certificate for etcd\'s TLS.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" etcd-keyfile' -l 'etcd-keyfile' -d 'Client key for etcd\'s TLS.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" iface' -l 'iface' -d 'The underlay interface (default: the interface of the default route).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" public-ip' -l 'public-ip' -d 'The address peers send to (default: the underlay\'s first IPv4 address).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" port' -l 'port' -d 'The UDP port (1-65535).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" mtu' -l 'mtu' -d 'The overlay MTU (default: underlay MTU - 28).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" device' -l 'device' -d 'The tun device to create.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" peers' -l 'peers' -d 'A peers file: one \'SUBNET IP[:PORT]\' per line, \'#\' comments; re-read on SIGHUP.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" subnet-file' -l 'subnet-file' -d 'Where to write flannel\'s subnet.env.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" ip-masq' -l 'ip-masq' -d 'Install flanneld\'s masquerade and forward rules (kept in place, removed by \'down\') and write FLANNEL_IPMASQ=true to the subnet file.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" masq-backend' -l 'masq-backend' -d 'With --ip-masq: nftables (table ip flannel-ipv4) or iptables (chains FLANNEL-POSTRTG, FLANNEL-FWD).' -rfka 'nftables iptables'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" masq-resync' -l 'masq-resync' -d 'With --ip-masq: seconds between checks that put the rules back if they were removed (flanneld\'s --iptables-resync).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" peer-check' -l 'peer-check' -d 'strict: accept a datagram only from the peer that owns its inner source; relaxed: any sender, if the inner source is in a known peer subnet (NAT).' -rfka 'strict relaxed'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" no-offload' -l 'no-offload' -d 'Force the plain data path: no TUN TSO, UDP GSO/GRO or TCP coalescing (each is otherwise probed and used when the kernel allows).'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" codel-target' -l 'codel-target' -d 'Receive-side CoDel: how long, in milliseconds, a bulk flow\'s datagrams may keep waiting in the UDP socket queue before it loses one (or has it ECN-marked); sparse flows are never dropped. Shortens the queue small flows wait behind when the senders back off on loss (cubic, reno), costs bulk throughput; 0 turns it off.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" express-size' -l 'express-size' -d 'Inner packets of at most this many bytes (pings, handshakes, short requests; not bare TCP acknowledgements, which stay with their flow) take a worker pair of their own in both directions, on one thread, so they wait neither behind bulk flows nor for a busy worker; 0 turns the express lane off.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" express-spin' -l 'express-spin' -d 'After the express lane forwards a packet, its thread keeps looking for the next one this many microseconds, yielding the CPU between looks, before it sleeps: a shorter round trip on an idle node, for up to that much CPU per packet that arrives alone, and never more than 2 % of a CPU past a 10 ms burst, however the packets come. It spins only while the other worker pairs have moved nothing for 10 ms, so not beside bulk flows; 0-1000, 0 sleeps at once.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" express-priority' -l 'express-priority' -d 'The SCHED_FIFO priority the express lane\'s thread takes while the CPUs are busy, so that short packets do not wait for a CPU behind the node\'s bulk work; it drops back to the normal scheduler when the CPUs are idle again, and for a flood (1 ms without sleeping, or 5 % of a CPU); 1-99, 0 never. Needs CAP_SYS_NICE or RLIMIT_RTPRIO; without either the lane keeps the normal scheduler (logged).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" workers' -l 'workers' -d 'Worker pairs, 1-64: each a tun queue, a UDP socket on the port and a thread per direction, beside the express lane\'s pair; one inner flow stays on one pair (default: the CPUs this process may run on, at most 8).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" metrics-addr' -l 'metrics-addr' -d 'Serve /healthz and Prometheus /metrics over HTTP on this IPv4 address and port, e.g. 127.0.0.1:9100 (off by default).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" detach' -l 'detach' -d 'Return once the node is ready, leaving the daemon running in the background.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" replace' -l 'replace' -d 'Take over from a daemon running for the device without losing a packet (a plain \'up\' if none runs).'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" log-file' -l 'log-file' -d 'With --detach: where the daemon logs (default: its state directory).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" v verbose' -l 'verbose' -s 'v' -d 'Log each packet-level event (debug level).'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp up" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp down" device' -l 'device' -d 'The overlay device.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp down" keep-lease' -l 'keep-lease' -d 'Leave this node\'s etcd lease in the registry (it expires by itself).'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp down" timeout' -l 'timeout' -d 'Seconds to wait for the daemon to stop before killing it.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp down" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp down" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp route" -eq 1' -fa 'add' -d 'Send a peer subnet to a node: route add SUBNET via IP[:PORT].'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp route" -eq 1' -fa 'del' -d 'Remove the route for a peer subnet.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_positional "flannel-udp route" -eq 1' -fa 'list' -d 'Show the kernel\'s overlay route and the daemon\'s peer table with counters.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route add" device' -l 'device' -d 'The overlay device.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route add" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route add" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route del" device' -l 'device' -d 'The overlay device.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route del" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route del" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route list" device' -l 'device' -d 'The overlay device.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route list" json' -l 'json' -d 'Print JSON for scripts instead of a table.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route list" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp route list" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp status" device' -l 'device' -d 'The overlay device.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp status" json' -l 'json' -d 'Print JSON for scripts instead of a table.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp status" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp status" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp cleanup" network' -l 'network' -d 'The overlay network (default: FLANNEL_NETWORK from the subnet file).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp cleanup" subnet' -l 'subnet' -d 'This node\'s subnet, to check cni0 against (default: FLANNEL_SUBNET from the subnet file).' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp cleanup" subnet-file' -l 'subnet-file' -d 'The subnet file to read the network and subnet from.' -rfka ''
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp cleanup" fix-cni0' -l 'fix-cni0' -d 'Re-address a cni0 bridge whose address is outside this node\'s subnet.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp cleanup" dry-run' -l 'dry-run' -d 'Print what would be removed and change nothing.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp cleanup" version' -l 'version' -d 'Show the version.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp cleanup" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'flannel-udp' -n '__flannel-udp_should_offer_completions_for_flags_or_options "flannel-udp help" version' -l 'version' -d 'Show the version.'
