package Test::Nginx::Socket;

# A small, self-contained re-implementation of the subset of
# openresty/test-nginx's Test::Nginx::Socket that this project uses.
# See the POD at the end of this file.

use strict;
use warnings;

our $VERSION = '0.29';

use Test::Base ();
BEGIN { our @ISA = ('Test::Base') }

use Test::Nginx::Util;

use POSIX qw( EAGAIN EINPROGRESS EWOULDBLOCK );
use Time::HiRes qw( sleep time );
use IO::Socket::INET ();
use IO::Select ();
use List::Util qw( min );
use Digest::MD5 ();
use Digest::SHA ();
use HTTP::Response ();
use Test::More ();
use Test::LongString ();

our @EXPORT = qw(
    env_to_nginx is_str run_tests run_test repeat_each config_preamble
    worker_connections master_process_enabled no_long_string workers
    master_on master_off log_level no_shuffle no_root_location use_hup
    server_name server_addr server_root html_dir server_port
    server_port_for_client timeout no_nginx_manager check_accum_error_log
    add_block_preprocessor bail_out add_cleanup_handler
    add_response_body_check
);

our $TotalConnectingTimeouts = 0;
our @ResponseBodyChecks;

$RunTestHelper         = \&run_test_helper;
$CheckErrorLog         = \&check_error_log;
$CheckShutdownErrorLog = \&check_shutdown_error_log;

{ no warnings 'once'; *run_test = \&Test::Nginx::Util::run_test; }

sub value_contains ($$);

sub set_http_config_filter ($) { $FilterHttpConfig = shift }
sub add_response_body_check ($) { push @ResponseBodyChecks, shift }

sub _no_ending () { Test::More->builder->no_ending(1) }

# Test::Base's is(): plain is() plus a Text::Diff diff for multi-line values
sub _is ($$$) {
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    return Test::Base::is($_[0], $_[1], $_[2]);
}

sub _is_string ($$$) {
    my ($got, $expected, $desc) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $ok = Test::LongString::is_string($got, $expected, $desc);
    if (!$ok && defined $got && defined $expected
        && ($got =~ /\n./ || $expected =~ /\n./)
        && eval { require Text::Diff; 1 })
    {
        Test::More::diag("diff (- expected, + got):\n"
            . Text::Diff::diff(\$expected, \$got, { STYLE => 'Unified' }));
    }
    return $ok;
}

# ---------------------------------------------------------------------------
# building requests
# ---------------------------------------------------------------------------

# Split a "request" text into its parts and produce the list of
# [original length, replacement] segments that turn it into a full
# HTTP request (request line normalized, headers inserted).
sub _request_segments ($$$$$) {
    my ($name, $text, $more_headers, $is_chunked, $conn) = @_;

    if (!defined $text || $text !~ /\S/) {
        bail_out("$name - Request line should be non-empty");
    }

    my ($first, $rest) = $text =~ /\A([^\n]*\n?)(.*)\z/s;
    my @m = $first =~ /^(\s*)(\S+)( *)(?:(\S+)( *))?(?:(\S+)( *))?(\s*)$/;
    if (!@m) {
        bail_out("$name - Request line is not valid. Should be "
                 . "'meth [url [version]]' but got \"$first\".");
    }
    my ($ws0, $meth, $ws1, $url, $ws2, $ver, $ws3, $eol) = @m;
    $_ //= '' for $ws2, $ws3;

    my $content = $rest // '';
    my $new_content = $content;
    my $len_header = '';
    if (!$is_chunked && $content ne ''
        && $more_headers !~ /(?:^|\n)Content-Length:/)
    {
        $new_content =~ s/^\s+|\s+$//gs;
        $len_header = "Content-Length: " . length($new_content) . "\r\n";
    }

    (my $mh = $more_headers) =~ s/(?<!\r)\n/\r\n/gs;
    my $headers = '';
    $headers .= "Host: $ServerName\r\n" if $mh !~ /(?:^|\n)Host:/msi;
    $headers .= "Connection: $conn\r\n" if $mh !~ /(?:^|\n)Connection/msi;
    $headers .= "$mh$len_header\r\n";

    return (
        [ length $ws0, '' ],
        [ length $meth, "$meth " ],
        [ length $ws1, '' ],
        [ defined $url ? length $url : 0, (defined $url ? $url : '/') . ' ' ],
        [ length $ws2, '' ],
        [ defined $ver ? length $ver : 0, (defined $ver ? $ver : 'HTTP/1.1') . "\r\n" ],
        [ length($ws3) + length($eol), '' ],
        [ 0, $headers ],
        [ length $content, $new_content ],
    );
}

# Apply the segments to a list of packets (strings), keeping the packet
# boundaries of the original text as far as possible.
sub _build_request_packets ($$$$$) {
    my ($name, $more_headers, $is_chunked, $conn, $packets) = @_;
    my $text = join '', map { $_ // '' } @$packets;
    my @segs = _request_segments($name, $text, $more_headers, $is_chunked, $conn);

    my @bounds;   # [start, end) of each packet in $text
    my $off = 0;
    for my $p (@$packets) {
        my $l = length($p // '');
        push @bounds, [$off, $off + $l];
        $off += $l;
    }
    my @out = ('') x @$packets;

    my $pos = 0;
    for my $seg (@segs) {
        my ($len, $rep) = @$seg;
        if ($len == 0) {
            my $idx = 0;
            for my $i (0 .. $#bounds) {
                $idx = $i if $bounds[$i][0] < $pos || ($pos == 0 && $i == 0);
            }
            $out[$idx] .= $rep;
        } else {
            my ($start, $end) = ($pos, $pos + $len);
            my @over = grep { $bounds[$_][0] < $end && $bounds[$_][1] > $start } 0 .. $#bounds;
            for my $k (0 .. $#over) {
                my $i = $over[$k];
                if ($k == $#over) {
                    $out[$i] .= $rep;
                } else {
                    my $n = min($bounds[$i][1], $end) - ($bounds[$i][0] > $start ? $bounds[$i][0] : $start);
                    $out[$i] .= substr($rep, 0, $n, '');
                }
            }
        }
        $pos += $len;
    }
    return \@out;
}

sub parse_more_headers ($) {
    my ($in) = @_;
    my ($out, $is_chunked) = ('', undef);
    for my $header (split /\n+/, $in) {
        next if $header =~ /^\s*\#/;
        my ($key, $val) = split /:\s*/, $header, 2;
        $val = '' unless defined $val;
        $is_chunked = 1 if lc($key) eq 'transfer-encoding' && $val eq 'chunked';
        $out .= "$key: $val\r\n";
    }
    return ($out, $is_chunked);
}

sub _headers_for ($$$) {
    my ($name, $more_headers, $i) = @_;
    if (ref $more_headers eq 'ARRAY') {
        my $h = $more_headers->[$i];
        bail_out("--- more_headers lacks data for the ${i}th request")
            unless defined $h;
        return parse_more_headers($h);
    }
    return parse_more_headers($more_headers);
}

# Returns a list of requests; each request is a list of packets
# ({ value => ..., delay_before => ... }).
sub get_req_from_block ($) {
    my ($block) = @_;
    my $name = $block->name;
    my @req_list;

    if (defined(my $raw = $block->raw_request)) {
        if (ref $raw eq 'ARRAY') {
            push @req_list, [ map { ref $_ eq 'HASH' ? $_ : { value => $_ } } @$raw ];
        } else {
            push @req_list, [ { value => $raw } ];
        }
        return \@req_list;
    }

    my $request = $block->request;
    if (defined $request && !ref $request) {
        1 while $request =~ s/^\s*\#[^\n]+\s+|^\s+//gs;
    }
    my $more_headers = $block->more_headers // '';

    if (my $reqs = $block->pipelined_requests) {
        bail_out("$name - invalid entries in --- pipelined_requests")
            if ref $reqs ne 'ARRAY';
        my $all = '';
        for my $i (0 .. $#$reqs) {
            my $conn = $i == $#$reqs ? 'close' : 'keep-alive';
            my ($hdr, $chunked) = _headers_for($name, $more_headers, $i);
            $all .= _build_request_packets($name, $hdr, $chunked, $conn, [ $reqs->[$i] ])->[0];
        }
        push @req_list, [ { value => $all } ];
        return \@req_list;
    }

    if (!ref $request) {
        my ($hdr, $chunked) = _headers_for($name, $more_headers, 0);
        push @req_list, [ { value => _build_request_packets($name, $hdr, $chunked,
                                                           'close', [$request])->[0] } ];
    } elsif (ref $request eq 'ARRAY') {
        my $i = 0;
        for my $one (@$request) {
            my ($hdr, $chunked) = _headers_for($name, $more_headers, $i);
            if (!ref $one) {
                push @req_list, [ { value => _build_request_packets($name, $hdr, $chunked,
                                                                   'close', [$one])->[0] } ];
            } elsif (ref $one eq 'ARRAY') {
                my @vals = map {
                    !ref $_ ? $_
                    : ref $_ eq 'HASH' ? $_->{value}
                    : bail_out("$name - Invalid syntax. $_ should be a string or hash with value.")
                } @$one;
                my $built = _build_request_packets($name, $hdr, $chunked, 'close', \@vals);
                my @pk;
                for my $j (0 .. $#$built) {
                    my %h = ref $one->[$j] eq 'HASH' ? %{ $one->[$j] } : ();
                    $h{value} = $built->[$j];
                    push @pk, \%h;
                }
                push @req_list, \@pk;
            } else {
                bail_out("$name - Invalid syntax. $one should be a string or an array of packets.");
            }
            $i++;
        }
    } else {
        bail_out("$name - invalid ---request : MUST be string or array of requests");
    }
    return \@req_list;
}

# ---------------------------------------------------------------------------
# talking to nginx
# ---------------------------------------------------------------------------

sub _connect ($$) {
    my ($name, $timeout) = @_;
    my $addr = $ServerAddr;
    my $total = $TotalConnectingTimeouts ? 20 : 50;
    my $err;
    for my $tries (1 .. $total) {
        my $sock = IO::Socket::INET->new(
            PeerAddr => $addr,
            PeerPort => $ServerPortForClient,
            Proto    => 'tcp',
            Timeout  => $timeout,
        );
        return $sock if $sock;
        $err = $!;
        if ($Test::Nginx::Util::NginxPid && !is_running($Test::Nginx::Util::NginxPid)) {
            last;   # nginx is gone, no point in waiting
        }
        my $wait = (sleep_time() + sleep_time() * $tries) * $tries / 2;
        $wait = 1 if $wait > 1;
        warn "$name - Can't connect to $addr:$ServerPortForClient: $err\n" if $wait >= 0.6;
        sleep $wait;
    }
    my $msg = "$name - Can't connect to $addr:$ServerPortForClient: $err (aborted)\n";
    if (++$TotalConnectingTimeouts < 3) {
        _no_ending();
        Test::More::fail($msg);
    } else {
        bail_out($msg);
    }
    return undef;
}

# Sends one request (list of packets) and reads until the server closes the
# connection.  Returns (raw response, is-HEAD-request).
sub send_request ($$$$) {
    my ($req, $middle_delay, $timeout, $block) = @_;
    my $name = $block->name;
    my @bits = @$req;

    my $all = join '', map { $_->{value} // '' } @bits;
    my $head_req = $all =~ /^\s*HEAD\s+/ ? 1 : 0;

    my $sock = _connect($name, $timeout) or return (undef, $head_req);
    $sock->blocking(0);
    local $SIG{PIPE} = 'IGNORE';

    my $resp = '';
    my $first = shift @bits;
    my $wbuf = $first->{value} // '';
    my $woff = 0;
    my $writing = 1;
    my $reading = 1;

    while ($reading) {
        my $rsel = IO::Select->new($sock);
        my $wsel = $writing ? IO::Select->new($sock) : undef;
        my ($r, $w) = IO::Select->select($rsel, $wsel, undef, $timeout);
        if (!$r && !$w) {
            close $sock;
            if (!defined $block->abort) {
                _no_ending();
                Test::More::fail("ERROR: client socket timed out - $name\n");
            } else {
                sleep 0.005;
            }
            return ($resp, $head_req);
        }

        if ($w && @$w) {
            while ($writing) {
                if ($woff < length $wbuf) {
                    my $n = syswrite($sock, $wbuf, length($wbuf) - $woff, $woff);
                    if (!defined $n) {
                        last if $! == EAGAIN || $! == EWOULDBLOCK;
                        warn "write failed: $!\n";
                        $resp = "write failed: $!" if $resp eq '';
                        $writing = 0;
                        last;
                    }
                    $woff += $n;
                    next;
                }
                my $next = shift @bits;
                if (!$next) {
                    $writing = 0;
                    if (defined(my $sd = $block->shutdown)) {
                        $sd = 1 if $sd =~ /^\s*$/s;
                        shutdown($sock, $sd);
                    }
                    last;
                }
                my $wait = defined $next->{delay_before} ? $next->{delay_before} : $middle_delay;
                sleep $wait if $wait;
                ($wbuf, $woff) = ($next->{value} // '', 0);
            }
        }

        if ($r && @$r) {
            while (1) {
                my $n = sysread($sock, my $buf, 4096);
                if (!defined $n) {
                    last if $! == EAGAIN || $! == EWOULDBLOCK;
                    warn "WARNING: $name - HTTP response read failure: $!\n";
                    $reading = 0;
                    last;
                }
                if ($n == 0) {
                    $reading = 0;
                    last;
                }
                $resp .= $buf;
            }
        }
    }
    close $sock;
    return ($resp, $head_req);
}

sub parse_response ($$$) {
    my ($name, $raw_resp, $head_req) = @_;
    my $left;
    my $raw_headers = '';
    $raw_headers = $1 if $raw_resp =~ /(.*?\r\n)\r\n/s;

    my $res = HTTP::Response->parse($raw_resp);
    my $code = $res->code;
    if ($code && $code !~ /^\d+$/) {
        undef $code;
        $res->code(undef);
    }
    return ($res, $raw_headers) if $code && ($code == 304 || $code == 101);

    my $enc = $res->header('Transfer-Encoding');
    my $len = $res->header('Content-Length');

    if (defined $enc && $enc eq 'chunked') {
        my $raw = $res->content // '';
        my $decoded = '';
        while (1) {
            if ($raw =~ /\G0[ \t]*\r\n\r\n/gcs) {
                $left = $1 if $raw =~ /\G(.+)/gcs;
                last;
            }
            if ($raw =~ /\G[ \t]*([A-Fa-f0-9]+)[ \t]*\r\n/gcs) {
                my $size = hex $1;
                my $pos = pos $raw;
                if (length($raw) - $pos < $size) {
                    _no_ending();
                    Test::More::fail("$name - invalid chunked data received "
                                     . "(not enought octets for the data section)");
                    return;
                }
                $decoded .= substr($raw, $pos, $size);
                pos($raw) = $pos + $size;
                if ($raw !~ /\G\r\n/gcs) {
                    _no_ending();
                    Test::More::fail("$name - invalid chunked data received (expected CRLF).");
                    return;
                }
            } elsif ($raw =~ /\G(.+)/gcs) {
                _no_ending();
                Test::More::fail("$name - invalid chunked body received: $1");
                return;
            } else {
                _no_ending();
                Test::More::fail("$name - no last chunk found - $raw");
                return;
            }
        }
        $res->content($decoded);
    } elsif (defined $len && $len ne '' && $len =~ /^\d+$/) {
        my $raw = $res->content // '';
        if (length $raw < $len) {
            warn "WARNING: $name - response body truncated: $len expected, but got ",
                 length $raw, "\n" unless $head_req;
        } elsif (length $raw > $len) {
            $left = substr $raw, $len;
            $res->content(substr $raw, 0, $len);
        }
    }
    return ($res, $raw_headers, $left);
}

# ---------------------------------------------------------------------------
# per-block driver
# ---------------------------------------------------------------------------

sub run_test_helper ($$$) {
    my ($block, $dry_run, $repeated_req_idx) = @_;
    my $name = $block->name;

    my $reqs = get_req_from_block($block);
    bail_out("$name - request empty") unless @$reqs;

    my $timeout = parse_time($block->timeout);
    $timeout = timeout() unless defined $timeout;
    $timeout = Test::Nginx::Util::valgrind_scaled($timeout);

    my ($res, $n, $need_array);
    my $req_idx = 0;

    for my $one_req (@$reqs) {
        my ($raw_resp, $head_req);
        if ($dry_run) {
            $raw_resp = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        } else {
            ($raw_resp, $head_req) = send_request($one_req,
                $block->raw_request_middle_delay, $timeout, $block);
        }

        if ($block->pipelined_requests) {
            $n = @{ $block->pipelined_requests };
            $need_array = 1;
        } else {
            $need_array = @$reqs > 1;
        }

        while (1) {
            $raw_resp = '' unless defined $raw_resp;
            my ($raw_headers, $left);
            if (!defined $block->ignore_response) {
                ($res, $raw_headers, $left) = parse_response($name, $raw_resp, $head_req);
            }

            if (!$n) {
                if (defined $left && length $left) {
                    (my $l = $left) =~ s/([\0-\037\200-\377])/sprintf('\x{%02x}', ord $1)/eg;
                    warn "WARNING: $name - unexpected extra bytes after last chunk in ",
                         "response: \"$l\"\n";
                }
            } else {
                $raw_resp = $left;
                $n--;
            }

            if (!defined $block->ignore_response) {
                check_error_code($block, $res, $dry_run, $req_idx, $need_array);
                check_raw_response_headers($block, $raw_headers, $dry_run, $req_idx, $need_array);
                check_response_headers($block, $res, $raw_headers, $dry_run, $req_idx, $need_array);
                transform_response_body($block, $res, $req_idx);
                check_response_body($block, $res, $dry_run, $req_idx, $repeated_req_idx, $need_array);
            }

            if ($n || $req_idx < @$reqs - 1) {
                sleep $block->wait if $block->wait;
                check_error_log($block, $res, $dry_run, $repeated_req_idx, $need_array);
                check_access_log($block, $dry_run, $repeated_req_idx)
                    unless defined $block->ignore_response;
            }

            $req_idx++;
            last unless $n;
        }
    }

    sleep $block->wait if $block->wait;
    check_error_log($block, $res, $dry_run, $repeated_req_idx, $need_array);
    check_access_log($block, $dry_run, $repeated_req_idx)
        unless defined $block->ignore_response;
}

sub get_indexed_value ($$$$) {
    my ($name, $value, $req_idx, $need_array) = @_;
    if ($need_array) {
        return $value->[$req_idx] if ref $value eq 'ARRAY';
        bail_out("$name - You asked for many requests, the expected results "
                 . "should be arrays as well.");
    }
    if (ref $value eq 'ARRAY') {
        bail_out("$name - SHOULD NOT HAPPEN: idx != 0 and don't need array.")
            if $req_idx != 0;
        return $value->[0];
    }
    return $value;
}

sub check_error_code ($$$$$) {
    my ($block, $res, $dry_run, $req_idx, $need_array) = @_;
    my $name = $block->name;
    my $got = ($res && $res->code) || '';
    SKIP: {
        Test::More::skip("$name - tests skipped due to $dry_run", 1) if $dry_run;
        if (defined $block->error_code_like) {
            my $val = get_indexed_value($name, $block->error_code_like, $req_idx, $need_array);
            Test::More::like($got, qr/$val/sm, "$name - status code ok");
        } elsif (defined $block->error_code) {
            _is($got, get_indexed_value($name, $block->error_code, $req_idx, $need_array),
                "$name - status code ok");
        } else {
            _is($got, 200, "$name - status code ok");
        }
    }
}

sub check_raw_response_headers ($$$$$) {
    my ($block, $raw_headers, $dry_run, $req_idx, $need_array) = @_;
    my $name = $block->name;
    $raw_headers //= '';
    if (defined $block->raw_response_headers_like) {
        SKIP: {
            Test::More::skip("$name - raw_response_headers_like - tests skipped due to $dry_run", 1)
                if $dry_run;
            my $exp = get_indexed_value($name, $block->raw_response_headers_like,
                                        $req_idx, $need_array);
            Test::More::like($raw_headers, qr/$exp/s, "$name - raw resp headers like");
        }
    }
    if (defined $block->raw_response_headers_unlike) {
        SKIP: {
            Test::More::skip("$name - raw_response_headers_unlike - tests skipped due to $dry_run", 1)
                if $dry_run;
            my $exp = get_indexed_value($name, $block->raw_response_headers_unlike,
                                        $req_idx, $need_array);
            Test::More::unlike($raw_headers, qr/$exp/s, "$name - raw resp headers unlike");
        }
    }
}

sub check_response_headers ($$$$$$) {
    my ($block, $res, $raw_headers, $dry_run, $req_idx, $need_array) = @_;
    my $name = $block->name;
    $raw_headers //= '';

    if (defined $block->response_headers) {
        my $headers = parse_headers(get_indexed_value($name, $block->response_headers,
                                                      $req_idx, $need_array));
        for my $h (@$headers) {
            my ($key, $val) = @$h;
            if (!defined $val) {
                SKIP: {
                    Test::More::skip("$name - response_headers - tests skipped due to $dry_run", 1)
                        if $dry_run;
                    Test::More::unlike($raw_headers, qr/^\s*\Q$key\E\s*:/ms,
                                       "$name - header $key not present in the raw headers");
                }
                next;
            }
            $val =~ s/\$ServerPort\b/$ServerPort/g;
            $val =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;
            my $actual = $res ? $res->header($key) : undef;
            $actual = '' unless defined $actual;
            SKIP: {
                Test::More::skip("$name - response_headers - tests skipped due to $dry_run", 1)
                    if $dry_run;
                _is($actual, $val, "$name - header $key ok");
            }
        }
    } elsif (defined $block->response_headers_like) {
        my $headers = parse_headers(get_indexed_value($name, $block->response_headers_like,
                                                      $req_idx, $need_array));
        for my $h (@$headers) {
            my ($key, $val) = @$h;
            $val = '' unless defined $val;
            my $actual = $res ? $res->header($key) : undef;
            $actual = '' unless defined $actual;
            SKIP: {
                Test::More::skip("$name - response_headers_like - tests skipped due to $dry_run", 1)
                    if $dry_run;
                Test::More::like($actual, qr/^$val$/, "$name - header $key like ok");
            }
        }
    }
}

sub run_filter_helper ($$$) {
    my ($block, $filter, $content) = @_;
    my $name = $block->name;
    if (ref $filter eq 'CODE') {
        return $filter->($content);
    }
    if (ref $filter) {
        bail_out("$name - the --- response_body_filters section only supports "
                 . "subroutine reference values and string values");
    }
    my %f = (
        md5_hex  => sub { Digest::MD5::md5_hex($_[0]) },
        sha1_hex => sub { Digest::SHA::sha1_hex($_[0]) },
        uc       => sub { uc $_[0] },
        lc       => sub { lc $_[0] },
        ucfirst  => sub { ucfirst $_[0] },
        lcfirst  => sub { lcfirst $_[0] },
        length   => sub { length $_[0] },
    );
    my $code = $f{$filter}
        or bail_out("$name - unknown filter, \"$filter\", specified in the "
                    . "--- response_body_filters section");
    return $code->($content);
}

sub transform_response_body ($$$) {
    my ($block, $res, $req_idx) = @_;
    return unless defined $res;
    my $content = $res->content;
    return unless defined $content;
    my $filters = $block->response_body_filters;
    return unless defined $filters;
    my $name = $block->name;

    if (!ref $filters) {
        $filters =~ s/^\s+|\s+$//gs;
        $filters = [ split /\s+/, $filters ];
    } elsif (ref $filters ne 'ARRAY') {
        $filters = [$filters];
    }
    my $filter = $filters;
    if (ref $filters->[0] eq 'ARRAY') {
        $filter = $filters->[$req_idx];
        bail_out("$name - the ---response_body_filters two-dimensional array "
                 . "unmatch the specified request($req_idx)") unless defined $filter;
    }
    my $new = $content;
    $new = run_filter_helper($block, $_, $new) for ref $filter eq 'ARRAY' ? @$filter : ($filter);
    $res->content($new);
}

sub check_response_body ($$$$$$) {
    my ($block, $res, $dry_run, $req_idx, $repeated_req_idx, $need_array) = @_;
    my $name = $block->name;

    my $content = $res ? $res->content : undef;
    if (defined $content) {
        $content =~ s/^TE: deflate,gzip;q=0\.3\r\n//gms;
        $content =~ s/^Connection: TE, close\r\n//gms;
    }

    if (defined $block->response_body) {
        my $expected = get_indexed_value($name, $block->response_body, $req_idx, $need_array);
        if (defined $expected && !ref $expected) {
            $expected =~ s/\$ServerPort\b/$ServerPort/g;
            $expected =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;
        }
        SKIP: {
            Test::More::skip("$name - response_body - tests skipped due to $dry_run", 1)
                if $dry_run;
            my $desc = "$name - response_body - response is expected "
                     . "(repeated req $repeated_req_idx, req $req_idx)";
            if (ref $expected) {
                Test::More::like($content, $expected,
                    "$name - response_body - like (repeated req $repeated_req_idx, req $req_idx)");
            } elsif ($NoLongString) {
                _is($content, $expected, $desc);
            } else {
                _is_string($content, $expected, $desc);
            }
        }
    } elsif (defined $block->response_body_like || defined $block->response_body_unlike) {
        my ($patterns, $type, $cmp) = defined $block->response_body_like
            ? ($block->response_body_like, 'like', \&Test::More::like)
            : ($block->response_body_unlike, 'unlike', \&Test::More::unlike);
        my $pat = get_indexed_value($name, $patterns, $req_idx, $need_array);
        $pat = '' unless defined $pat;
        $pat =~ s/\$ServerPort\b/$ServerPort/g;
        $pat =~ s/\$ServerPortForClient\b/$ServerPortForClient/g;
        my $summary = trim($content) // '';
        SKIP: {
            Test::More::skip("$name - response_body_$type - tests skipped due to $dry_run", 1)
                if $dry_run;
            $cmp->($content, qr/$pat/s,
                   "$name - response_body_$type - response is expected ($summary)");
        }
    }

    for my $check (@ResponseBodyChecks) {
        $check->($block, $res ? $res->content : undef, $req_idx, $repeated_req_idx, $dry_run);
    }
}

# ---------------------------------------------------------------------------
# log checks
# ---------------------------------------------------------------------------

sub fmt_str ($) {
    my $str = shift;
    chomp $str;
    $str =~ s/"/\\"/g;
    $str =~ s/\r/\\r/g;
    $str =~ s/\n/\\n/g;
    return $str;
}

sub value_contains ($$) {
    my ($val, $pat) = @_;
    return $val =~ /\Q$pat\E/ if !ref $val || ref $val eq 'Regexp';
    if (ref $val eq 'ARRAY') {
        for my $v (@$val) {
            return 1 if value_contains($v, $pat);
        }
    }
    return undef;
}

# section value -> list of patterns (strings match as substrings, qr// as regex)
sub _pattern_list ($) {
    my $pats = shift;
    if (!ref $pats) {
        chomp $pats;
        return [ split /\n+/, $pats ];
    }
    return [$pats] if ref $pats eq 'Regexp';
    return [@$pats];
}

sub _line_matches ($$) {
    my ($line, $pat) = @_;
    return ref $pat ? scalar($line =~ /$pat/) : scalar($line =~ /\Q$pat\E/);
}

sub _check_log_has ($$$$$$$) {
    my ($name, $what, $logname, $lines, $pats, $dry_run, $suffix) = @_;
    for my $line (@$lines) {
        for my $pat (@$pats) {
            next unless defined $pat;
            if (_line_matches($line, $pat)) {
                SKIP: {
                    Test::More::skip("$name - $what - tests skipped due to $dry_run", 1) if $dry_run;
                    Test::More::pass("$name - pattern \"$pat\" matches a line in $logname$suffix");
                }
                undef $pat;
            }
        }
    }
    for my $pat (@$pats) {
        next unless defined $pat;
        SKIP: {
            Test::More::skip("$name - $what - tests skipped due to $dry_run", 1) if $dry_run;
            Test::More::fail("$name - pattern \"$pat\" should match a line in $logname$suffix");
        }
    }
}

sub _check_log_lacks ($$$$$$$) {
    my ($name, $what, $logname, $lines, $pats, $dry_run, $suffix) = @_;
    my %found;
    for my $i (0 .. $#$lines) {
        my $line = $lines->[$i];
        for my $pat (@$pats) {
            next unless defined $pat;
            next unless _line_matches($line, $pat);
            _no_ending() if $found{$pat}++;
            SKIP: {
                Test::More::skip("$name - $what - tests skipped due to $dry_run ($line)", 1)
                    if $dry_run;
                my @more;
                for (my $j = $i + 1; $j < min($i + 10, @$lines - 1); $j++) {
                    push @more, $lines->[$j];
                }
                Test::More::fail("$name - pattern \"" . fmt_str($pat)
                    . "\" should not match any line in $logname but matches line \""
                    . fmt_str($line) . "\"$suffix\n" . join('', @more));
            }
        }
    }
    for my $pat (@$pats) {
        next if !defined $pat || $found{$pat};
        SKIP: {
            Test::More::skip("$name - $what - tests skipped due to $dry_run", 1) if $dry_run;
            Test::More::pass("$name - pattern \"" . fmt_str($pat)
                             . "\" does not match a line in $logname$suffix");
        }
    }
}

sub check_access_log ($$$) {
    my ($block, $dry_run, $repeated_req_idx) = @_;
    my $name = $block->name;
    my $lines;
    if (defined $block->access_log) {
        $lines ||= access_log_data();
        _check_log_has($name, 'access_log', 'access.log', $lines,
                       _pattern_list($block->access_log), $dry_run,
                       " (req $repeated_req_idx)");
    }
    if (defined $block->no_access_log) {
        $lines ||= access_log_data();
        _check_log_lacks($name, 'no_access_log', 'access.log', $lines,
                         _pattern_list($block->no_access_log), $dry_run,
                         " (req $repeated_req_idx)");
    }
}

sub check_error_log ($$$$$) {
    my ($block, $res, $dry_run, $repeated_req_idx, $need_array) = @_;
    my $name = $block->name;
    my $lines;
    my %warn_about = ('[alert]' => 1, '[crit]' => 1, '[emerg]' => 1);

    my $grep_pats = $block->grep_error_log;
    my $grep_pat;
    if (defined $grep_pats) {
        $grep_pat = ref $grep_pats eq 'ARRAY' ? $grep_pats->[$repeated_req_idx] : $grep_pats;
    } elsif (defined $block->grep_error_log_out) {
        bail_out("$name - No --- grep_error_log defined but --- grep_error_log_out is defined");
    }
    if (defined $grep_pat) {
        my $expected = $block->grep_error_log_out;
        bail_out("$name - No --- grep_error_log_out defined but --- grep_error_log is defined")
            unless defined $expected;
        $expected = $expected->[$repeated_req_idx] if ref $expected eq 'ARRAY';
        SKIP: {
            Test::More::skip("$name - error_log - tests skipped due to $dry_run", 1) if $dry_run;
            $lines ||= error_log_data();
            my $matched = '';
            for my $line (@$lines) {
                my $m;
                if (ref $grep_pat) {
                    $m = $& if $line =~ /$grep_pat/;
                } else {
                    $m = $& if $line =~ /\Q$grep_pat\E/;
                }
                $matched .= "$m\n" if defined $m && $m !~ /\n/;
            }
            my $desc = "$name - grep_error_log_out (req $repeated_req_idx)";
            if (ref $expected eq 'Regexp') {
                Test::More::like($matched, $expected, $desc);
            } elsif ($NoLongString) {
                _is($matched, $expected, $desc);
            } else {
                _is_string($matched, $expected, $desc);
            }
        }
    }

    for my $sec (qw(error_log no_error_log)) {
        my $pats = $block->$sec;
        next unless defined $pats;
        for my $lvl (keys %warn_about) {
            (my $p = $lvl) =~ s/\]$//;
            delete $warn_about{$lvl} if value_contains($pats, $p);
        }
        $lines ||= error_log_data();
        if ($sec eq 'error_log') {
            _check_log_has($name, 'error_log', 'error.log', $lines,
                           _pattern_list($pats), $dry_run, " (req $repeated_req_idx)");
        } else {
            _check_log_lacks($name, 'no_error_log', 'error.log', $lines,
                             _pattern_list($pats), $dry_run, " (req $repeated_req_idx)");
        }
    }

    if (!$dry_run && %warn_about) {
        $lines ||= error_log_data();
        for my $line (@$lines) {
            for my $lvl (keys %warn_about) {
                warn "WARNING: $name - " . fmt_str($line) . "\n"
                    if index($line, $lvl) >= 0;
            }
        }
    }

    for my $line (@{ $lines || [] }) {
        if ($line =~ /\bAssertion .*?failed\b/) {
            _no_ending();
            chomp(my $l = $line);
            Test::More::fail("$name - $l\n");
        }
    }
}

sub check_shutdown_error_log ($$) {
    my ($block, $dry_run) = @_;
    my $name = $block->name;
    my $lines;
    if (defined $block->no_shutdown_error_log) {
        $lines ||= error_log_data();
        _check_log_lacks($name, 'no_shutdown_error_log', 'error.log', $lines,
                         _pattern_list($block->no_shutdown_error_log), $dry_run, '');
    }
    $lines ||= error_log_data();
    _check_log_has($name, 'shutdown_error_log', 'error.log', $lines,
                   _pattern_list($block->shutdown_error_log), $dry_run, '');
}

1;
__END__

=encoding utf-8

=head1 NAME

Test::Nginx::Socket - local, minimal re-implementation of openresty's
Test::Nginx::Socket (data-driven nginx tests)

=head1 SYNOPSIS

    use Test::Nginx::Socket 'no_plan';   # or: plan tests => repeat_each() * 2 * blocks();

    repeat_each(2);
    no_shuffle();
    run_tests();

    __DATA__

    === TEST 1: hello
    --- config
        location = /t { return 200 "hello\n"; }
    --- request
    GET /t
    --- response_body
    hello
    --- no_error_log
    [error]

Run with C<prove -I t/lib -r t/> (or C<PERL5LIB=t/lib prove -r t/>).

=head1 DESCRIPTION

The CPAN distribution Test::Nginx (github.com/openresty/test-nginx) cannot
be installed here, so this directory carries a small re-implementation of
the part of it this project uses.  Test files must stay valid for the
real module: everything below follows the real module's semantics and
data format (it is also built on L<Test::Base>, so block/section parsing,
filters such as C<eval>/C<chomp>, and C<ONLY>/C<SKIP>/C<LAST> are
Test::Base's own), and it emits the same number of tests per block, so
C<plan tests =E<gt> ...> formulas work unchanged.

=head2 Environment

C<TEST_NGINX_BINARY> (default C<nginx> in C<PATH>),
C<TEST_NGINX_LOAD_MODULES> (space separated F<.so> paths; C<load_module>
lines are appended to C<main_config>, as the real module does),
C<TEST_NGINX_SERVER_PORT> / C<TEST_NGINX_PORT> (default 1984; exported
back as C<TEST_NGINX_SERVER_PORT>), C<TEST_NGINX_CLIENT_PORT>,
C<TEST_NGINX_SERVROOT> (default F<t/servroot>; C<TEST_NGINX_SERVER_ROOT>
is set to it), C<TEST_NGINX_TIMEOUT> (3), C<TEST_NGINX_LOG_LEVEL>
(debug), C<TEST_NGINX_MASTER_PROCESS>, C<TEST_NGINX_NO_SHUFFLE>,
C<TEST_NGINX_SLEEP>, C<TEST_NGINX_CHECK_ACCUM_ERR_LOG>,
C<TEST_NGINX_WORKER_USER>, C<TEST_NGINX_EVENT_TYPE>,
C<TEST_NGINX_POSTPONE_OUTPUT>, C<TEST_NGINX_NO_NGINX_MANAGER>,
C<TEST_NGINX_VERBOSE>, C<TEST_NGINX_USE_VALGRIND> (see L</Valgrind mode>).

C<$TEST_NGINX_FOO> is replaced by C<$ENV{TEST_NGINX_FOO}> (bail out if
unset) in the sections where the real module does it: C<config>,
C<http_config>, C<main_config>, C<post_main_config> and C<user_files>.
C<$TEST_NGINX_RAND_PORT_N> gets a free random port.  (Like the real
module, C<request>, C<response_body> etc. are B<not> expanded; use
C<--- request eval> with C<$ENV{...}>.  C<$ServerPort> is expanded in
C<response_body*> and C<response_headers>.)

=head2 Functions

C<run_tests>, C<repeat_each>, C<workers>, C<master_on>, C<master_off>,
C<master_process_enabled>, C<log_level>, C<no_shuffle>,
C<no_long_string>, C<no_root_location>, C<env_to_nginx>, C<timeout>,
C<worker_connections>, C<config_preamble>, C<server_name>,
C<server_addr>, C<server_port>, C<server_port_for_client>,
C<server_root>, C<html_dir>, C<check_accum_error_log>,
C<add_block_preprocessor>, C<add_cleanup_handler>,
C<add_response_body_check>, C<bail_out>, C<is_str>, C<no_nginx_manager>,
plus everything L<Test::Base> exports (C<plan>, C<blocks>, C<is>, ...).
Defaults as in the real module: one worker, C<master_process off>,
C<daemon on>, log level C<debug>, blocks shuffled.

=head2 Block sections

=over

=item C<main_config>, C<http_config>, C<config>, C<post_main_config>,
C<server_name>, C<log_level>, C<user_files>, C<init>

Generated F<conf/nginx.conf> has the real module's layout
(C<worker_processes>, C<daemon>, C<master_process>,
C<error_log .../logs/error.log LEVEL>, C<pid>, C<env> lines,
main_config, C<http { access_log; default_type text/plain;
keepalive_timeout 68; http_config; server { listen PORT; server_name
'localhost'; client_max_body_size 30M; config; location / {root html}}}>,
post_main_config, C<events { accept_mutex off; worker_connections 64; }>,
C<user root;> when run as root).  A block without C<config> reuses the
previous block's configuration.

=item C<request>, C<more_headers>, C<raw_request>, C<pipelined_requests>,
C<raw_request_middle_delay>, C<timeout>, C<shutdown>, C<abort>

C<GET /t> becomes C<GET /t HTTP/1.1> with C<Host: localhost> and
C<Connection: close> (unless given in C<more_headers>); a body gets a
C<Content-Length> (body trimmed) unless chunked.  C<request eval>
returning an array ref sends each request in turn on its own
connection; then C<error_code>, C<response_body*>, C<response_headers*>
and C<more_headers> must be array refs too.  An element may itself be an
array of packets (strings or C<< {value =>, delay_before =>} >>).
Responses are read until the server closes; chunked bodies are decoded.

=item C<error_code> (default 200), C<error_code_like>,
C<response_body> (exact, via Test::LongString, plus a unified diff on
failure; C<eval> may give a qr//), C<response_body_like> /
C<response_body_unlike> (C<qr/$pat/s>, not anchored),
C<response_body_filters>, C<response_headers> (C<Name: value>;
C<!Name> = absent), C<response_headers_like> (C<qr/^$val$/>, ignored
when C<response_headers> is present), C<raw_response_headers_like> /
C<_unlike>, C<ignore_response>

=item C<error_log>, C<no_error_log>, C<grep_error_log> /
C<grep_error_log_out>, C<access_log>, C<no_access_log>, C<wait>,
C<shutdown_error_log> / C<no_shutdown_error_log>

One line per pattern, plain substring match per log line, or qr// (or
an array of both) via C<eval>.  Checked after every request against
the lines logged since the previous check (the first check of a block
sees the whole log, including start-up).  C<[alert]>, C<[crit]> and
C<[emerg]> lines are warned about; "Assertion ... failed" lines fail.

=item C<must_die>

nginx must fail to start: one test (exit code equals the value if it is
a number, else non-zero), then C<error_log>/C<no_error_log> are checked
against F<logs/error.log>, or, if that stayed empty, nginx's stderr. The
fallback is a deviation from the real Test::Nginx (which reads
F<error.log> only): nginx built with C<--error-log-path=stderr>, as
Debian's packages are, reports configuration errors on stderr alone.

=item C<ONLY>, C<SKIP>, C<LAST> (Test::Base), C<skip_eval>,
C<skip_nginx>, C<todo>

=back

=head2 Test count per block (same as the real module)

Per C<repeat_each> round and per request: 1 for the status code, 1 per
C<response_headers> (or C<response_headers_like>) line, 1 for
C<response_body>/C<_like>/C<_unlike>, 1 per C<raw_response_headers_*>,
1 per C<error_log>/C<no_error_log>/C<access_log> pattern (these are
checked after every request), 1 for C<grep_error_log>.  C<must_die>: 1
plus the log patterns.  C<shutdown_error_log>: 1 per pattern, once.

=head2 Process handling

Per block: F<servroot/{conf,html,logs}> are recreated, nginx is started
as C<nginx -p SERVROOT/ -c SERVROOT/conf/nginx.conf> (daemon on: when
that command returns the port is already listening; a start-up failure
is a BAIL_OUT showing nginx's stderr, retried for up to 10 s only if
the port is still in use), the pid file is awaited (and with
C<master_on> the workers), requests are sent (connects are retried with
back-off, as the real module does), then nginx is stopped (QUIT and up
to C<timeout()> seconds, then TERM, then KILL of its process group)
before the next block.  An END block and INT/TERM/HUP/PIPE handlers stop
nginx (TERM) if the test dies or is interrupted (PIPE: the harness
reading its output is gone); an nginx still starting in valgrind mode
(no pid file yet) is killed with its process group.  (Under valgrind nginx
runs in the foreground instead: see L</Valgrind mode>.)

=head2 Valgrind mode

C<TEST_NGINX_USE_VALGRIND> runs every nginx under valgrind, as the real
module does (the supported subset):

=over

=item *

A number (e.g. C<1>) means the real module's command line:
C<valgrind --num-callers=100 -q --tool=memcheck --leak-check=full
--show-possibly-lost=no --gen-suppressions=all
[--suppressions=valgrind.suppress] nginx -p ... -c ...>, the
C<--suppressions> option only if F<valgrind.suppress> exists in the current
directory.  Any other value is valgrind's options, verbatim:
C<valgrind -q $TEST_NGINX_USE_VALGRIND nginx ...>, word-split by
C</bin/sh> (the real module runs that line through the shell too, so quotes
work).  Valgrind writes its reports to nginx's stderr unless the options
say C<--log-file=...%p...> (one log per process); whatever nginx and
valgrind wrote to stderr is printed after nginx has stopped.  The block
name is printed (C<warn>) before each start, as the real module does.

=item *

The generated F<nginx.conf> says C<daemon off>: nginx stays in the
foreground as the runner's own child (fork/exec, its own process group) and
is reaped.  C<master_process> stays as configured (C<master_on()>,
C<workers(N)>): valgrind follows fork(), so master and workers are all
checked.  Start-up: the runner waits up to 60 s for the pid file with the
child's pid (then the port listens); a child that exits first is a start
failure (bail out with its stderr, retried only on "Address already in
use", as without valgrind).  With C<master_on> it waits for the workers to
be forked.

=item *

Stopping: QUIT, then up to 30 s for nginx (and valgrind's leak check) to
exit, then TERM, then KILL of the process group.  An interrupted test
(INT/TERM/HUP) sends TERM and also waits.

=item *

C<--- must_die> blocks run without valgrind (as in the real module), with
the same C<daemon off> configuration: nginx must exit (a must_die nginx
that writes its pid file instead counts as started, and is stopped).

=item *

Timeouts: the client's read timeout (C<timeout()>, C<--- timeout>) is
multiplied by C<TEST_NGINX_VALGRIND_TIMEOUT_FACTOR> (default 10); memcheck
makes nginx 20-50 times slower.  (The real module only adds
C<$ValgrindExtraTimeout>, 0.3 s, to its HTTP/3 idle timeout; a real-module
run under valgrind usually needs C<TEST_NGINX_TIMEOUT> raised instead.)
Timeouts inside the tested nginx configurations are not changed.

=item *

Extension: if C<TEST_NGINX_VALGRIND_PID_LOG> names a file, a line
C<PID E<lt>tabE<gt> test block name> is appended to it for every nginx process
(master and workers) run under valgrind, so that per-process valgrind logs
can be traced back to their blocks (F<scripts/test-valgrind> uses it).

=back

Not supported with valgrind (as without): C<use_hup()> reloads,
C<TEST_NGINX_CHECK_LEAK>, C<TEST_NGINX_USE_STAP>, C<TEST_NGINX_BENCHMARK>.
The runner does not itself judge valgrind's reports; F<scripts/test-valgrind>
does, from the log files.

=head2 Not implemented (differences from the real module)

HTTP/2 / HTTP/3 / curl (C<http2>, C<http3>, C<curl>), C<tcp_listen> /
C<udp_listen> mock servers, C<stap*>, check-leak / benchmark
/ HUP-reload modes (C<use_hup()> is a no-op), C<skip_nginx2>,
C<skip_openssl>, C<skip_slave>, C<todo_nginx>, C<charset>,
C<server_addr_for_client>, deprecated C<request_eval> /
C<response_body_eval>, C<TEST_NGINX_RANDOMIZE>, C<TEST_NGINX_USE_*>
other than C<TEST_NGINX_USE_VALGRIND>,
C<TEST_NGINX_ERROR_LOG>.  Such sections are silently ignored.  The real
module keeps nginx running between blocks and stops the last one at
exit; this one stops it after every block (so C<shutdown_error_log> is
checked right away, and a block without C<config> gets a fresh log).
Start-up failures other than "Address already in use" bail out at once
(the real module retries every failure for 30 s).  A client timeout
fails the block with Test::Builder's C<no_ending> set, exactly as in
the real module (so the exit code can stay 0; prove still reports the
C<not ok>).

=cut
