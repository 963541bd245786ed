# Shared by the .t files: makes one test request speak for many client addresses.
#
# clients(@addrs) returns server-level config for `location = /t`, whose SSI page includes
# /via/ADDR three times per line, one line per address. /via/ADDR proxies to the "client"
# server on $TEST_NGINX_REALIP_PORT with X-Real-IP: ADDR; that server trusts X-Real-IP
# (realip), so the kylin balancer behind it sees ADDR as the client address.
#
# nginx limits one configuration token to 4 KB, so the page is split into parts of at most
# 3000 bytes (whole lines), each its own SSI location, included in order by /t.
use strict;
use warnings;

sub ssi_page {
    my @lines = @_;    # each: a string of SSI includes, one output line
    my @parts = ("");
    for my $line (@lines) {
        push @parts, "" if length($parts[-1]) + length($line) + 1 > 3000 && length $parts[-1];
        $parts[-1] .= "$line\n";
    }
    my $cfg = "    location = /t {\n        default_type text/html;\n        ssi on;\n        return 200 '"
        . CORE::join("", map { qq{<!--# include virtual="/part/$_" wait="yes" -->} } 1 .. @parts) . "';\n    }\n";
    for my $i (1 .. @parts) {
        $cfg .= "    location = /part/$i {\n        default_type text/html;\n        ssi on;\n"
            . "        return 200 '$parts[$i - 1]';\n    }\n";
    }
    return $cfg;
}

# Each client address asks three times.
sub clients {
    my @addrs = @_;
    return ssi_page(map { my $a = $_; CORE::join "", map { qq{<!--# include virtual="/via/$a" wait="yes" -->} } 1 .. 3 } @addrs)
        . via_location();
}

# /via/ADDR[/s/SESSION] -> client server, as client ADDR, with Cookie JSESSIONID=SESSION (an
# empty JSESSIONID= without /s/); /via/X/ADDR... -> location /X there. Query strings pass.
sub via_location {
    return <<'_EOC_';
    location /via/ {
        rewrite "^/via/(?:(?<kylin_loc>\w)/)?(?<kylin_addr>[^/]+)(?:/s/(?<kylin_sid>.+))?$" /$kylin_loc break;
        proxy_pass http://127.0.0.1:$TEST_NGINX_REALIP_PORT;
        proxy_set_header X-Real-IP $kylin_addr;
        proxy_set_header Cookie "JSESSIONID=$kylin_sid";
    }
_EOC_
}

# The "client" server /via/ADDR proxies to: it trusts X-Real-IP, passes every request to the
# upstream kylin_nodes and serves its status on /status.
sub client_server {
    return <<'_EOC_';
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
        location = /status { kylin_status; }
    }
_EOC_
}

1;
