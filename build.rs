//! Build script: passes nginx-sys's build facts (features, OS, version, build directory) to
//! the compiler, as ngx-rust's example module does, so code can be gated on the nginx version
//! it is built against.
//!
//! `nginx-sys` must be a direct dependency for its `DEP_NGINX_*` variables to reach us.
fn main() {
    // The module is linked by the system's GNU ld, as before Rust 1.90 made its own LLD the
    // default on x86_64 Linux: valgrind 3.19 (Debian 12) cannot map the debug info of an
    // LLD-linked .so ("ELF section outside all mapped regions", every frame "???"), and
    // scripts/test-valgrind checks this very file, not a build of its own. The last -fuse-ld
    // wins, and this comes after rustc's.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo::rustc-cdylib-link-arg=-fuse-ld=bfd");
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_feature, values({}))",
        std::env::var("DEP_NGINX_FEATURES_CHECK").unwrap_or("any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    if let Ok(features) = std::env::var("DEP_NGINX_FEATURES") {
        for feature in features.split(',').map(str::trim) {
            println!("cargo::rustc-cfg=ngx_feature=\"{feature}\"");
        }
    }

    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_os, values({}))",
        std::env::var("DEP_NGINX_OS_CHECK").unwrap_or("any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS");
    if let Ok(os) = std::env::var("DEP_NGINX_OS") {
        println!("cargo::rustc-cfg=ngx_os=\"{os}\"");
    }

    // Version gates:
    // - 1.23.0 keeps request `Cookie` and upstream `Set-Cookie` headers in linked lists
    //   (`headers_in.cookie`, `u->headers_in.set_cookie`); before, in arrays;
    // - 1.27.3 added peer reference counting (`refs`, `zombie`) and the zone peers' `config`
    //   generation, with `resolve` in upstream zones;
    // - 1.25.4 added the request's `terminated` flag (ticket #2555), which tells a blocked
    //   request's resumer that the request was terminated meanwhile;
    // - 1.29.6 added `sticky`, `server ... route= drain` (a draining peer's `down` is 2) and
    //   the sticky fields of the round-robin peer data;
    // - 1.29.7 made upstream keepalive the default: the keepalive module wraps every
    //   upstream's balancer after all are initialised, so `keepalive` no longer sets
    //   `peer.init_upstream` when it is read (in 1.30 stable and 1.31 mainline);
    // - 1.31.0 added `least_time`.
    const VERSION_CHECKS: &[(u64, &str)] = &[
        (1_023_000, "nginx1_23_0"),
        (1_025_004, "nginx1_25_4"),
        (1_027_003, "nginx1_27_3"),
        (1_029_006, "nginx1_29_6"),
        (1_029_007, "nginx1_29_7"),
        (1_031_000, "nginx1_31_0"),
    ];
    for check in VERSION_CHECKS {
        println!("cargo::rustc-check-cfg=cfg({})", check.1);
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    if let Ok(version) = std::env::var("DEP_NGINX_VERSION_NUMBER") {
        if let Ok(version) = version.parse::<u64>() {
            for check in VERSION_CHECKS {
                if version >= check.0 {
                    println!("cargo::rustc-cfg={}", check.1);
                }
            }
        }
    }

    // The scripts read this from cargo's JSON output to find the nginx binary built with us.
    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    println!("cargo::rustc-check-cfg=cfg(ngx_upstream_sid)");
    if let Ok(build_dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=DEP_NGINX_BUILD_DIR={build_dir}");
        // nginx 1.29.6+ with its sticky module (the default) gives round-robin peers a `sid`
        // and the peer connection a `hint` and `sid` (NGX_HTTP_UPSTREAM_SID): the balancer
        // then follows `sticky`'s hint and tells it which server it chose.
        let auto_config = std::path::Path::new(&build_dir).join("ngx_auto_config.h");
        println!("cargo::rerun-if-changed={}", auto_config.display());
        if std::fs::read_to_string(&auto_config)
            .is_ok_and(|c| c.lines().any(|l| l.split_whitespace().eq(["#define", "NGX_HTTP_UPSTREAM_SID", "1"])))
        {
            println!("cargo::rustc-cfg=ngx_upstream_sid");
        }
    }
}
