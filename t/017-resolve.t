# `server NAME resolve;` in a zone (nginx 1.27.3+): the servers change under traffic as a DNS
# server of the test's own changes its answers (t/dns.py, a UDP responder on loopback, its
# answers set through /dns/ by the test page). nginx frees the peers a change removes, so
# nothing may read them outside `get` and `free`: every request must succeed, reach the new
# servers once nginx has re-resolved, no worker may crash, and the status page must list the
# current servers. Requests carry sessions checked in a private Redis, so the preaccess phase
# (near_bound) and the re-sharing of learned routes (share_again) run between the changes too.
use Test::Nginx::Socket;
use Digest::SHA ();
use JSON::PP ();
use POSIX ();

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    $ENV{TEST_NGINX_REDIS_PORT} ||= $base + 31;
    $ENV{TEST_NGINX_DNS_PORT} ||= $base + 60;
    $ENV{TEST_NGINX_DNS_CONTROL_PORT} ||= $base + 61;
    $ENV{TEST_NGINX_BACKEND_PORT} ||= $base + 62;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";
require "$FindBin::Bin/redis.pl";

our $N = 6;    # sessions
sub sid { sprintf "DN5TE5T5E55I0N%02d", $_[0] }

# `resolve` in upstream zones and peer reference counts came with 1.27.3.
sub nginx_has_resolve {
    my $bin = $ENV{TEST_NGINX_BINARY} || 'nginx';
    my $v = `'$bin' -v 2>&1` // '';
    my ($maj, $min, $pat) = $v =~ m{nginx/(\d+)\.(\d+)\.(\d+)} or return 0;
    return sprintf("%d.%03d%03d", $maj, $min, $pat) >= 1.027003;
}

our $DnsPid;
our $DnsOwner = $$;
sub start_dns {
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        { exec "python3", "$FindBin::Bin/dns.py", "--dns-port", $ENV{TEST_NGINX_DNS_PORT},
            "--control-port", $ENV{TEST_NGINX_DNS_CONTROL_PORT}, "--name", "kylin.test",
            "--addrs", "127.0.0.2,127.0.0.3"; }
        POSIX::_exit(127);
    }
    $DnsPid = $pid;
    for (1 .. 100) {
        return if IO::Socket::INET->new(PeerAddr => "127.0.0.1:$ENV{TEST_NGINX_DNS_CONTROL_PORT}");
        select undef, undef, undef, 0.05;
    }
    die "t/dns.py did not start\n";
}
END { local $?; if ($DnsPid && $$ == $DnsOwner) { kill 'TERM', $DnsPid; waitpid $DnsPid, 0 } }

if (!nginx_has_resolve()) {
    plan skip_all => "nginx before 1.27.3 has no \"resolve\" in upstream zones";
} elsif (!have_redis()) {
    plan skip_all => "redis-server and redis-cli are needed";
} else {
    require IO::Socket::INET;
    start_dns();
    start_redis($ENV{TEST_NGINX_REDIS_PORT});
    plan 'no_plan';
}

sub dns { my ($what) = @_; qq{<!--# include virtual="/dns/$what" wait="yes" -->} }

# Sets the answers and waits until nginx asked twice since (so the first answer was applied).
sub change { my ($tag, $addrs) = @_; "$tag " . dns("set?$addrs") . dns("queries?2") }

# Session $i logs in from its own client address: the response sets its cookie, so the
# balancer learns its route.
sub logins {
    map { my $s = sid($_); qq{L$_ <!--# include virtual="/via/10.1.$_.1/s/$s?login=$s" wait="yes" -->} } 1 .. $N;
}

# Twelve concurrent requests: the sessions' (from other addresses), and with $mixed also
# session-less ones.
sub round {
    my ($tag, $mixed) = @_;
    return $tag . CORE::join "", map {
        my $i = 1 + $_ % $N;
        my $s = sid($i);
        ($mixed && $_ % 2) ? qq{ <!--# include virtual="/via/10.3.$_.1" -->}
                           : qq{ <!--# include virtual="/via/10.2.$i.$_/s/$s" -->}
    } 1 .. 12;
}

# Rounds a quarter of a second apart, for about $secs seconds.
sub traffic {
    my ($secs, $mixed) = @_;
    return map { round("T", $mixed) . dns("sleep?0.25") } 1 .. int($secs * 4);
}

sub page {
    return main::ssi_page(@_, q{S <!--# include virtual="/status-via" wait="yes" -->})
        . main::via_location() . <<'_EOC_';
    location /dns/ {
        proxy_pass http://127.0.0.1:$TEST_NGINX_DNS_CONTROL_PORT/;
    }
    location /status-via {
        proxy_pass http://127.0.0.1:$TEST_NGINX_REALIP_PORT/status;
    }
_EOC_
}

our $HTTP_CONFIG = main::client_server() . <<'_EOC_';
    map $arg_login $login_cookie { "" ""; default "JSESSIONID=$arg_login; Path=/"; }
    kylin_upstream kylin_nodes {
        zone kylin_nodes 256k;
        resolver 127.0.0.1:$TEST_NGINX_DNS_PORT valid=1s ipv6=off;
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s cache_invalid=1s;
        kylin_session_routes zone=kylin_dns_routes:1m timeout=10s;
        server kylin.test:$TEST_NGINX_BACKEND_PORT resolve;
    }
    server {
        listen 127.0.0.2:$TEST_NGINX_BACKEND_PORT;
        listen 127.0.0.3:$TEST_NGINX_BACKEND_PORT;
        listen 127.0.0.4:$TEST_NGINX_BACKEND_PORT;
        listen 127.0.0.5:$TEST_NGINX_BACKEND_PORT;
        listen 127.0.0.6:$TEST_NGINX_BACKEND_PORT;
        listen 127.0.0.7:$TEST_NGINX_BACKEND_PORT;
        listen 127.0.0.8:$TEST_NGINX_BACKEND_PORT;
        location / {
            add_header Set-Cookie $login_cookie;
            return 200 "$server_addr:$server_port";
        }
    }
_EOC_

# The checks, from the page's lines: "TAG answer answer ...", one answer per include (a
# backend's address, or nothing for /dns/), and "S {status JSON}" last.
add_response_body_check(sub {
    my ($block, $body, $req_idx, $repeated_req_idx, $dry_run) = @_;
    my $name = $block->name;
    return if $dry_run;
    my $port = $ENV{TEST_NGINX_BACKEND_PORT};
    my (%final, %login, $status, $answers, $bad);
    for my $line (split /\n/, $body // '') {
        my ($tag, @words) = split / /, $line;
        if ($tag eq 'S') {
            $status = CORE::join ' ', @words;
            next;
        }
        for my $w (@words) {
            $answers++;
            $bad .= "$tag: $w\n" unless $w =~ /\A127\.0\.0\.[2-8]:$port\z/;
        }
        push @{ $final{$tag} }, @words if $tag =~ /^F\d$/;
        $login{$1} = $words[0] if $tag =~ /^L(\d+)$/;
    }
    ok($answers && !defined $bad, "$name - every request answered by a backend")
        or diag("answers: " . ($answers // 0) . "\nnot a backend:\n" . ($bad // ''));

    # Once nginx has re-resolved, requests go to the new servers only.
    for my $expect (split /\n/, $block->final // '') {
        my ($tag, @addrs) = split / /, $expect;
        my %ok = map { ("$_:$port" => 1) } @addrs;
        my @got = @{ $final{$tag} || [] };
        ok(@got && !grep({ !$ok{$_} } @got), "$name - $tag: requests reach the current servers (@addrs)")
            or diag("got: @got");
    }

    # The status page lists exactly the current servers.
    my $doc = eval { JSON::PP::decode_json($status // '') };
    my @listed = sort map { $_->{address} } @{ $doc->{upstreams}{kylin_nodes}{servers} || [] };
    my @current = sort map { "$_:$port" } split / /, $block->status_servers // '';
    is("@listed", "@current", "$name - the status page lists the current servers");

    # The session store holds, for every session, the route it was learned with (or none).
    if ($block->check_routes) {
        for my $i (sort keys %login) {
            my $up = "kylin_nodes";
            my $key = "kylin:route:" . substr(Digest::SHA::sha256_hex(pack("Q<", length $up) . $up . sid($i)), 0, 32);
            chomp(my $v = `redis-cli -p $ENV{TEST_NGINX_REDIS_PORT} GET $key`);
            ok($v eq '' || $v eq $login{$i}, "$name - session $i: the route in Redis is the learned one")
                or diag("Redis: \"$v\", learned on $login{$i}");
        }
    }
});

# What every block has besides its page and its own checks.
add_block_preprocessor(sub {
    my $block = shift;
    my %default = (
        http_config => $HTTP_CONFIG,
        request => "GET /t",
        response_body_like => '^C0 \nL1 127\.0\.0\.',
        no_error_log => "[error]\n[alert]\n[crit]\nexited on signal\n",
        timeout => 60,
    );
    for my $k (sort keys %default) {
        $block->set_value($k, $default{$k}) unless defined $block->$k;
    }
});

master_on();
workers(2);
# Each include of the page holds up to five connections (page, client server, backend).
worker_connections(1024);
no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: servers change three times under traffic (sessions and session-less requests)
--- config eval
main::page(
    main::change("C0", "127.0.0.2,127.0.0.3"),
    main::logins(),
    main::traffic(1, 1),
    main::change("C1", "127.0.0.3,127.0.0.4,127.0.0.5"),
    main::round("F1", 1),
    main::traffic(1, 1),
    # A change during traffic (nothing waits for it), then the wait.
    "C2 " . main::dns("set?127.0.0.6"),
    main::traffic(2, 1),
    "Q2 " . main::dns("queries?2"),
    main::round("F2", 1),
    main::change("C3", "127.0.0.2,127.0.0.7,127.0.0.8"),
    main::round("F3", 1),
)
--- final
F1 127.0.0.3 127.0.0.4 127.0.0.5
F2 127.0.0.6
F3 127.0.0.2 127.0.0.7 127.0.0.8
--- status_servers: 127.0.0.2 127.0.0.7 127.0.0.8



=== TEST 2: learned routes re-shared after a quiet change name the servers they were learned on
Every server is replaced while no request runs, once the sessions' routes are due to be
written to Redis again (half the routes' timeout): the first session request of each worker
after the change re-shares its route from tables built before it. Before the fix those tables
pointed at the freed peers, whose memory the new peers reuse: Redis got the new servers' names.
--- config eval
main::page(
    main::change("C0", "127.0.0.2,127.0.0.3,127.0.0.4"),
    main::logins(),
    "W " . main::dns("sleep?5.2"),
    main::change("C1", "127.0.0.5,127.0.0.6,127.0.0.7"),
    main::round("F1"),
    main::round("F1"),
)
--- final
F1 127.0.0.5 127.0.0.6 127.0.0.7
--- status_servers: 127.0.0.5 127.0.0.6 127.0.0.7
--- check_routes: 1
