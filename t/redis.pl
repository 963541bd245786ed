# Shared by the .t files that need Redis: starts a private redis-server (and, on request, a
# three-master Redis Cluster) for this test file and stops it at exit.
#
#   my $port = start_redis($port);            # standalone, no persistence
#   redis_cmd($port, "SET", "k", "v");
#   my @ports = start_redis_cluster(@ports);  # three masters, all 16384 slots covered
#   my $ca = start_redis_tls($port);          # TLS only; returns the test CA's certificate
#   start_sentinel($port, "name", $master_port);
use strict;
use warnings;
use File::Temp qw(tempdir);
use POSIX ();

our @RedisPids;
our $RedisOwner = $$;   # END runs in forked children too: only the owner stops Redis
our $RedisDir = tempdir("kylin-redis-XXXXXX", TMPDIR => 1, CLEANUP => 1);

sub have_redis { return system("command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1") == 0 }

sub wait_redis {
    my ($port) = @_;
    for (1 .. 100) {
        my $out = `redis-cli -p $port PING 2>/dev/null`;
        return 1 if defined $out && $out =~ /PONG/;
        select undef, undef, undef, 0.05;
    }
    die "redis-server on port $port did not start\n";
}

sub start_redis {
    my ($port, @extra) = @_;
    my $dir = "$RedisDir/$port";
    mkdir $dir;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$dir/out.log";
        open STDERR, '>&', \*STDOUT;
        { exec "redis-server", "--port", $port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", $dir, @extra; }
        POSIX::_exit(127);
    }
    push @RedisPids, $pid;
    wait_redis($port);
    return $port;
}

# A Redis that speaks TLS only, on 127.0.0.1:$port and 127.0.0.2:$port, with a certificate for
# 127.0.0.1 and localhost (not 127.0.0.2) issued by a test CA made here. Returns the CA certificate's path.
sub start_redis_tls {
    my ($port) = @_;
    my $dir = "$RedisDir/tls-$port";
    mkdir $dir;
    open my $ext, '>', "$dir/ext.cnf" or die "$dir/ext.cnf: $!";
    print $ext "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
    close $ext;
    for my $cmd (
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout $dir/ca.key -out $dir/ca.crt -days 2 -subj /CN=kylin-test-ca",
        "openssl req -newkey rsa:2048 -nodes -keyout $dir/server.key -out $dir/server.csr -subj /CN=localhost",
        "openssl x509 -req -in $dir/server.csr -CA $dir/ca.crt -CAkey $dir/ca.key -CAcreateserial -out $dir/server.crt -days 2 -extfile $dir/ext.cnf",
    ) {
        system("$cmd >>$dir/openssl.log 2>&1") == 0 or die "$cmd failed (see $dir/openssl.log)\n";
    }
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$dir/out.log";
        open STDERR, '>&', \*STDOUT;
        { exec "redis-server", "--port", 0, "--tls-port", $port, "--bind", "127.0.0.1", "127.0.0.2", "--save", "", "--appendonly", "no",
            "--dir", $dir, "--tls-cert-file", "$dir/server.crt", "--tls-key-file", "$dir/server.key",
            "--tls-ca-cert-file", "$dir/ca.crt", "--tls-auth-clients", "no"; }
        POSIX::_exit(127);
    }
    push @RedisPids, $pid;
    for (1 .. 100) {
        my $out = `redis-cli --tls --cacert $dir/ca.crt -p $port PING 2>/dev/null`;
        return "$dir/ca.crt" if defined $out && $out =~ /PONG/;
        select undef, undef, undef, 0.05;
    }
    die "redis-server with TLS on port $port did not start\n";
}

sub redis_tls_cmd {
    my ($port, $ca, @args) = @_;
    system("redis-cli", "--tls", "--cacert", $ca, "-p", $port, @args) == 0 or die "redis-cli @args failed\n";
}

# A Redis Sentinel on $port that monitors the master $name on 127.0.0.1:$master_port.
sub start_sentinel {
    my ($port, $name, $master_port) = @_;
    my $dir = "$RedisDir/sentinel-$port";
    mkdir $dir;
    open my $conf, '>', "$dir/sentinel.conf" or die "$dir/sentinel.conf: $!";
    print $conf "port $port\nbind 127.0.0.1\ndir $dir\nsentinel monitor $name 127.0.0.1 $master_port 1\n"
        . "sentinel down-after-milliseconds $name 1000\nsentinel failover-timeout $name 3000\n";
    close $conf;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$dir/out.log";
        open STDERR, '>&', \*STDOUT;
        { exec "redis-server", "$dir/sentinel.conf", "--sentinel"; }
        POSIX::_exit(127);
    }
    push @RedisPids, $pid;
    for (1 .. 100) {
        my $out = `redis-cli -p $port SENTINEL get-master-addr-by-name $name 2>/dev/null`;
        return $port if defined $out && $out =~ /\b$master_port\b/;
        select undef, undef, undef, 0.05;
    }
    die "redis-sentinel on port $port did not start\n";
}

sub redis_cmd {
    my ($port, @args) = @_;
    system("redis-cli", "-p", $port, @args) == 0 or die "redis-cli @args failed\n";
}

sub start_redis_cluster {
    my @ports = @_;
    for my $p (@ports) {
        start_redis($p, "--cluster-enabled", "yes", "--cluster-config-file", "nodes-$p.conf",
            "--cluster-node-timeout", "2000");
    }
    my $nodes = join " ", map { "127.0.0.1:$_" } @ports;
    system("redis-cli --cluster create $nodes --cluster-replicas 0 --cluster-yes >$RedisDir/cluster-create.log 2>&1") == 0
        or die "redis-cli --cluster create failed\n";
    # Every node must see the whole cluster (not just the first one).
    for (1 .. 100) {
        my $ready = grep {
            my $info = `redis-cli -p $_ CLUSTER INFO 2>/dev/null`;
            $info =~ /cluster_state:ok/ && $info =~ /cluster_known_nodes:3\b/ && $info =~ /cluster_slots_ok:16384/
        } @ports;
        return @ports if $ready == @ports;
        select undef, undef, undef, 0.1;
    }
    die "the Redis cluster did not become ready\n";
}

sub stop_redis {
    for my $pid (@RedisPids) {
        kill 'TERM', $pid;
        waitpid $pid, 0;
    }
    @RedisPids = ();
}

END { local $?; stop_redis() if $$ == $RedisOwner }   # keep the test's exit status

1;
