//! `sslmode=verify-full` as deployed: the CA comes from `DATABASE_CA_PEM`
//! (no file next to the binary), loaded by the functions' own `DbConfig` and
//! `db::connect_lazy`, against a throwaway cluster serving TLS with a
//! certificate from a throwaway CA (issued for `localhost` only).
//!
//! One cluster for every case (starting one costs about a second).

use std::path::Path;
use std::process::Command;

use stagepass_platform::config::{DbConfig, Loader};
use stagepass_platform::db;

use crate::pgcluster::{Cluster, ServerTls};

/// A CA (certificate PEM) and, when `server` is set, a server certificate
/// and key it signed for `DNS:localhost` only (not 127.0.0.1).
fn issue(dir: &Path, name: &str) -> (String, Option<ServerTls>) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (it comes with Debian's ca-certificates)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca_crt) = (format!("{name}-ca.key"), format!("{name}-ca.crt"));
    let subject = format!("/CN=Stagepass test CA {name}");
    let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    openssl(&args);
    let ca_pem = std::fs::read_to_string(dir.join(&ca_crt)).expect("ca pem");
    if name != "right" {
        return (ca_pem, None);
    }
    let mut args = vec!["req", "-subj", "/CN=localhost"];
    args.extend(ec);
    args.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read pem");
    let server = ServerTls {
        cert_pem: read("server.crt"),
        key_pem: read("server.key"),
    };
    (ca_pem, Some(server))
}

/// Connects as a function would with these settings; whether TLS was used.
async fn connect(url: &str, ca_pem: &str) -> Result<bool, String> {
    let mut l = Loader::from_map([("DATABASE_URL", url), ("DATABASE_CA_PEM", ca_pem)]);
    let cfg = DbConfig::load(&mut l).expect("db config");
    l.finish().map_err(|e| e.to_string())?;
    let pool = db::connect_lazy(&cfg).map_err(|e| e.to_string())?;
    let ssl =
        sqlx::query_scalar::<_, bool>("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string());
    pool.close().await;
    ssl
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_with_the_ca_from_the_environment() {
    let certs = tempdir();
    let (right_ca, server) = issue(&certs, "right");
    let (wrong_ca, _) = issue(&certs, "wrong");
    let cluster = Cluster::start_with(server.as_ref()).expect("cluster with TLS");
    let port = cluster.port();
    let url = |host: &str, mode: &str| {
        format!("postgres://postgres@{host}:{port}/postgres?sslmode={mode}")
    };

    // The name in the certificate, the CA that signed it: connected, over TLS.
    assert_eq!(
        connect(&url("localhost", "verify-full"), &right_ca).await,
        Ok(true)
    );
    // Another CA: refused, under both verifying modes.
    for mode in ["verify-full", "verify-ca"] {
        let err = connect(&url("localhost", mode), &wrong_ca)
            .await
            .expect_err(mode);
        assert!(err.to_lowercase().contains("certificate"), "{mode}: {err}");
    }
    // The right CA but another name (the certificate is for localhost, not
    // 127.0.0.1): verify-full refuses, verify-ca accepts.
    let err = connect(&url("127.0.0.1", "verify-full"), &right_ca)
        .await
        .expect_err("hostname mismatch");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert_eq!(
        connect(&url("127.0.0.1", "verify-ca"), &right_ca).await,
        Ok(true)
    );

    drop(cluster);
    let _ = std::fs::remove_dir_all(&certs);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stagepass-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).expect("temp dir");
    dir
}
