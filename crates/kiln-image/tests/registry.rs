//! Pulls against a real registry (Debian's docker-registry) with images built from local
//! files by kiln's OCI writer.

mod common;

use common::{blob_files, file_digest, layer, layer_paths, quiet, store, Registry};
use kiln_image::oci::{build_index, Flavor, ImageBuilder, LayerBuilder};
use kiln_image::{Compression, Credentials, Error, PullOptions};

fn two_layer_image(seed: &str) -> kiln_image::oci::BuiltImage {
    ImageBuilder::new()
        .layer(layer(&format!("{seed}-a"), Compression::Gzip))
        .layer(layer(&format!("{seed}-b"), Compression::Zstd))
        .cmd(&["/bin/sh", "-c", "echo hi"])
        .env(&["PATH=/bin"])
        .build()
        .expect("image")
}

#[test]
fn pull_by_tag_then_by_digest() {
    let registry = Registry::start();
    let image = two_layer_image("tag");
    registry.push("app", "v1", &image);
    let (_dir, store) = store();

    let reference = registry.reference("app:v1");
    let record = store.pull(&reference, &quiet()).expect("pull by tag");
    assert_eq!(record.reference, reference);
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_eq!(record.config_digest, image.config.digest);
    assert_eq!(record.index_digest, None);
    assert_eq!(record.layers.len(), 2);
    assert_eq!(record.layers[0].compression, Compression::Gzip);
    assert_eq!(record.layers[1].compression, Compression::Zstd);
    for (got, want) in record.layers.iter().zip(&image.layers) {
        assert_eq!(got.digest, want.blob.digest);
        assert_eq!(got.size, want.blob.data.len() as u64);
        assert_eq!(file_digest(&got.path), got.digest, "stored blob verified");
    }
    let cmd = record
        .config
        .config()
        .as_ref()
        .and_then(|c| c.cmd().clone())
        .expect("cmd");
    assert_eq!(cmd, ["/bin/sh", "-c", "echo hi"]);
    assert!(layer_paths(&record.layers[1]).contains(&"etc/seed".to_string()));

    // By digest: no blob is downloaded again.
    let by_digest = format!("{}/app@{}", registry.addr, image.manifest.digest);
    let again = store.pull(&by_digest, &quiet()).expect("pull by digest");
    assert_eq!(again.reference, by_digest);
    assert_eq!(again.manifest_digest, image.manifest.digest);
    for l in &image.layers {
        assert_eq!(registry.blob_gets("app", &l.blob.digest), 1, "fetched once");
    }

    // `ensure` finds it stored and asks the registry nothing.
    let before = registry.manifest_requests("app");
    assert!(before > 0);
    let ensured = store.ensure(&reference, &quiet()).expect("ensure");
    assert_eq!(ensured.manifest_digest, image.manifest.digest);
    assert_eq!(registry.manifest_requests("app"), before);

    // Lookups by short digest and repo@digest.
    let hex = &image.manifest.digest["sha256:".len()..];
    assert_eq!(
        store.resolve(&hex[..10]).expect("prefix").manifest_digest,
        image.manifest.digest
    );
    let names: Vec<String> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.reference)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn docker_schema2_with_uncompressed_layer() {
    let registry = Registry::start();
    let image = ImageBuilder::new()
        .layer(layer("d1", Compression::Gzip))
        .layer(layer("d2", Compression::None))
        .flavor(Flavor::Docker)
        .cmd(&["/bin/true"])
        .build()
        .expect("image");
    registry.push("docker/style", "latest", &image);
    let (_dir, store) = store();
    let record = store
        .pull(&registry.reference("docker/style"), &quiet())
        .expect("pull docker schema2");
    assert_eq!(
        record.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(record.layers[0].compression, Compression::Gzip);
    assert_eq!(record.layers[1].compression, Compression::None);
    assert!(layer_paths(&record.layers[1]).contains(&"etc/seed".to_string()));
}

#[test]
fn multi_layer_image_with_whiteouts_is_stored_in_order() {
    let registry = Registry::start();
    let mut base = LayerBuilder::new();
    base.dir("etc/", 0o755).expect("dir");
    base.file("etc/keep", 0o644, b"keep").expect("file");
    base.file("etc/gone", 0o644, b"gone").expect("file");
    base.dir("var/cache/", 0o755).expect("dir");
    base.file("var/cache/old", 0o644, b"old").expect("file");
    let mut top = LayerBuilder::new();
    top.whiteout("etc/gone").expect("whiteout");
    top.opaque("var/cache").expect("opaque");
    top.file("var/cache/new", 0o644, b"new").expect("file");
    top.symlink("etc/link", "keep").expect("symlink");
    let image = ImageBuilder::new()
        .layer(base.finish(Compression::Gzip).expect("base"))
        .layer(top.finish(Compression::Gzip).expect("top"))
        .layer(layer("third", Compression::Zstd))
        .build()
        .expect("image");
    registry.push("whiteouts", "latest", &image);
    let (_dir, store) = store();
    let record = store
        .pull(&registry.reference("whiteouts:latest"), &quiet())
        .expect("pull");
    let digests: Vec<&str> = record.layers.iter().map(|l| l.digest.as_str()).collect();
    let want: Vec<&str> = image
        .layers
        .iter()
        .map(|l| l.blob.digest.as_str())
        .collect();
    assert_eq!(digests, want, "application order");
    let top_paths = layer_paths(&record.layers[1]);
    assert!(
        top_paths.contains(&"etc/.wh.gone".to_string()),
        "{top_paths:?}"
    );
    assert!(top_paths.contains(&"var/cache/.wh..wh..opq".to_string()));
}

#[test]
fn index_resolves_to_linux_amd64() {
    let registry = Registry::start();
    let amd64 = ImageBuilder::new()
        .layer(layer("amd64", Compression::Gzip))
        .build()
        .expect("amd64 image");
    let arm64 = ImageBuilder::new()
        .layer(layer("arm64", Compression::Gzip))
        .architecture("arm64")
        .build()
        .expect("arm64 image");
    // arm64 listed first, so picking the first entry would be wrong.
    let index = build_index(&[&arm64, &amd64], Flavor::Oci).expect("index");
    registry.push_index("multi", "latest", &[&arm64, &amd64], &index);
    let (_dir, store) = store();
    let record = store
        .pull(&registry.reference("multi"), &quiet())
        .expect("pull index");
    assert_eq!(record.manifest_digest, amd64.manifest.digest);
    assert_eq!(record.index_digest.as_deref(), Some(index.digest.as_str()));
    assert_eq!(record.config.architecture().to_string(), "amd64");
    assert_eq!(registry.blob_gets("multi", &arm64.layers[0].blob.digest), 0);

    // By the index digest too.
    let by_index = format!("{}/multi@{}", registry.addr, index.digest);
    let record = store
        .pull(&by_index, &quiet())
        .expect("pull by index digest");
    assert_eq!(record.manifest_digest, amd64.manifest.digest);

    // An index without amd64 says what it has.
    let only_arm = build_index(&[&arm64], Flavor::Docker).expect("index");
    registry.push_index("armonly", "latest", &[&arm64], &only_arm);
    let err = store
        .pull(&registry.reference("armonly"), &quiet())
        .expect_err("no amd64");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::NoMatchingPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64"), "{err}");
}

#[test]
fn htpasswd_auth() {
    let registry = Registry::start_with_auth("kiln", "s3cret");
    let image = two_layer_image("auth");
    registry.push("private", "latest", &image);
    let (dir, store) = store();
    let reference = registry.reference("private");

    let err = store
        .pull(&reference, &quiet())
        .expect_err("anonymous pull of a private image");

    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::AuthRequired { .. }), "{err}");
    assert!(err.to_string().contains("kiln login"), "{err}");

    let wrong = PullOptions {
        credentials: Some(Credentials {
            username: "kiln".into(),
            password: "wrong".into(),
        }),
        ..quiet()
    };
    let err = store.pull(&reference, &wrong).expect_err("wrong password");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains(&registry.addr), "{err}");
    assert!(
        blob_files(&store).is_empty(),
        "nothing stored after auth failures"
    );

    let bad_login = kiln_image::login(
        dir.path(),
        &registry.addr,
        &Credentials {
            username: "kiln".into(),
            password: "nope".into(),
        },
        false,
    )
    .expect_err("login with a wrong password");
    assert!(matches!(bad_login, Error::AuthFailed { .. }), "{bad_login}");

    kiln_image::login(
        dir.path(),
        &registry.addr,
        &Credentials {
            username: "kiln".into(),
            password: "s3cret".into(),
        },
        false,
    )
    .expect("login");
    let auth_file = dir.path().join("auth.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&auth_file)
            .expect("auth.json")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let record = store.pull(&reference, &quiet()).expect("pull after login");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert!(kiln_image::logout(dir.path(), &registry.addr).expect("logout"));
}

#[test]
fn corrupt_blob_is_refused_and_not_kept() {
    let registry = Registry::start();
    let image = two_layer_image("corrupt");
    registry.push("corrupt", "latest", &image);
    let bad = &image.layers[1].blob;
    let data_path = registry.blob_data(&bad.digest);
    let mut data = std::fs::read(&data_path).expect("registry blob");
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&data_path, &data).expect("corrupting the blob");

    let (_dir, store) = store();
    let err = store
        .pull(&registry.reference("corrupt"), &quiet())
        .expect_err("corrupt blob");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&bad.digest),
        "names the blob: {err}"
    );
    // Blobs are asked for as a range from byte 0 (206), so kiln's own check is the one that
    // caught the corruption: oci-client does not hash them a second time.
    let log = std::fs::read_to_string(&registry.log).unwrap_or_default();
    let needle = format!("\"GET /v2/corrupt/blobs/{} ", bad.digest);
    assert!(
        log.lines()
            .any(|l| l.contains(&needle) && l.contains("\" 206 ")),
        "registry log:\n{log}"
    );
    assert!(!store.has_blob(&bad.digest));
    let files = blob_files(&store);
    assert!(
        files.iter().all(|f| !f.starts_with('.')),
        "no temp files left: {files:?}"
    );
    assert!(!files.contains(&image.manifest.digest["sha256:".len()..].to_string()));
    assert!(
        store.list().expect("list").is_empty(),
        "no reference recorded"
    );
}

#[test]
fn interrupted_pull_resumes_without_refetching_finished_layers() {
    let registry = Registry::start();
    let image = ImageBuilder::new()
        .layer(layer("r1", Compression::Gzip))
        .layer(layer("r2", Compression::Gzip))
        .layer(layer("r3", Compression::Zstd))
        .build()
        .expect("image");
    registry.push("resume", "latest", &image);
    // The registry loses layer 2 for a while: the first pull fails on it.
    let missing = &image.layers[1].blob.digest;
    let data_path = registry.blob_data(missing);
    let aside = data_path.with_extension("aside");
    std::fs::rename(&data_path, &aside).expect("hiding a blob");

    let (_dir, store) = store();
    let reference = registry.reference("resume");
    let err = store
        .pull(&reference, &quiet())
        .expect_err("pull with a missing blob");
    eprintln!("expected error: {err}");
    assert!(err.to_string().contains(missing), "names the blob: {err}");
    assert!(store.has_blob(&image.layers[0].blob.digest));
    assert!(store.has_blob(&image.layers[2].blob.digest));
    assert!(!store.has_blob(missing));
    assert!(store.list().expect("list").is_empty());

    std::fs::rename(&aside, &data_path).expect("restoring the blob");
    let record = store.pull(&reference, &quiet()).expect("resumed pull");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_eq!(
        registry.blob_gets("resume", &image.layers[0].blob.digest),
        1
    );
    assert_eq!(
        registry.blob_gets("resume", &image.layers[2].blob.digest),
        1
    );
    assert!(registry.blob_gets("resume", missing) >= 2);
}

#[test]
fn concurrent_pulls_of_one_image() {
    let registry = Registry::start();
    let image = two_layer_image("concurrent");
    registry.push("same", "latest", &image);
    let (dir, _store) = store();
    let reference = registry.reference("same");
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let root = dir.path().to_path_buf();
            let reference = reference.clone();
            std::thread::spawn(move || {
                let store = kiln_image::Store::open(&root).expect("open");
                store.pull(&reference, &quiet())
            })
        })
        .collect();
    for t in threads {
        let record = t.join().expect("thread").expect("concurrent pull");
        assert_eq!(record.manifest_digest, image.manifest.digest);
    }
    let store = kiln_image::Store::open(dir.path()).expect("open");
    let list = store.list().expect("list");
    assert_eq!(list.len(), 1);
    let files = blob_files(&store);
    assert!(files.iter().all(|f| !f.starts_with('.')), "{files:?}");
    for name in &files {
        let digest = format!("sha256:{name}");
        assert_eq!(
            file_digest(&store.blob_path(&digest).expect("path")),
            digest
        );
    }
    // Prune keeps everything an image uses.
    let report = store.prune().expect("prune");
    assert!(report.removed.is_empty(), "{:?}", report.removed);
    assert_eq!(blob_files(&store), files);
}

#[test]
fn errors_are_clear_and_leave_nothing() {
    let registry = Registry::start();
    registry.push("exists", "v1", &two_layer_image("err"));
    let (_dir, store) = store();

    let unknown_repo = registry.reference("nope:latest");
    let err = store
        .pull(&unknown_repo, &quiet())
        .expect_err("unknown repo");
    eprintln!("expected error: {err}");
    assert_eq!(err.to_string(), format!("image not found: {unknown_repo}"));

    let unknown_tag = registry.reference("exists:v2");
    let err = store.pull(&unknown_tag, &quiet()).expect_err("unknown tag");
    eprintln!("expected error: {err}");
    assert_eq!(err.to_string(), format!("image not found: {unknown_tag}"));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let err = store
        .pull(&format!("127.0.0.1:{closed}/x:1"), &quiet())
        .expect_err("unreachable");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach registry 127.0.0.1:{closed}")),
        "{err}"
    );

    for bad in ["UPPER", "a//b", "x:tag with space", "repo@sha256:short", ""] {
        let err = store.pull(bad, &quiet()).expect_err(bad);
        eprintln!("expected error: {err}");
        assert!(
            matches!(err, Error::InvalidReference { .. }),
            "{bad}: {err}"
        );
    }

    assert!(blob_files(&store).is_empty());
    assert!(store.list().expect("list").is_empty());
}

#[test]
fn leftovers_of_a_killed_pull_do_not_matter() {
    let registry = Registry::start();
    let image = two_layer_image("killed");
    registry.push("killed", "latest", &image);
    let (_dir, store) = store();
    // What a pull killed mid-download leaves: a temp file next to the blobs, and a finished
    // blob of the first layer.
    let first = &image.layers[0].blob;
    let hex = &first.digest["sha256:".len()..];
    std::fs::write(
        store.blob_dir().join(format!(".tmp-{hex}-999999-0")),
        &first.data[..first.data.len() / 2],
    )
    .expect("half-written temp file");
    std::fs::write(store.blob_dir().join(hex), &first.data).expect("finished blob");

    let record = store
        .pull(&registry.reference("killed"), &quiet())
        .expect("pull after a killed one");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_eq!(
        registry.blob_gets("killed", &first.digest),
        0,
        "not refetched"
    );
    let report = store.prune().expect("prune");
    assert_eq!(report.removed, [format!(".tmp-{hex}-999999-0")]);
}

/// Credentials from Docker's config file. Runs in a child process (this test binary again)
/// because it sets `DOCKER_CONFIG`, which other tests must not see.
#[test]
fn docker_config_credentials() {
    let registry = Registry::start_with_auth("dockeruser", "dockerpass");
    let image = two_layer_image("dockercfg");
    registry.push("viadocker", "latest", &image);
    let config_dir = tempfile::tempdir().expect("tmp");
    let auth = base64_encode(b"dockeruser:dockerpass");
    std::fs::write(
        config_dir.path().join("config.json"),
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            registry.addr
        ),
    )
    .expect("config.json");
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "docker_config_child",
            "--include-ignored",
            "--nocapture",
        ])
        .env("DOCKER_CONFIG", config_dir.path())
        .env("KILN_TEST_PULL", registry.reference("viadocker"))
        .output()
        .expect("running the child test");
    assert!(
        out.status.success(),
        "child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

#[test]
#[ignore = "run by docker_config_credentials in a child process"]
fn docker_config_child() {
    let reference = std::env::var("KILN_TEST_PULL").expect("KILN_TEST_PULL");
    let (_dir, store) = store();
    store
        .pull(&reference, &quiet())
        .expect("pull with Docker's credentials");
}

/// Docker's credential helpers (`credsStore`, `credHelpers`), as fake
/// `docker-credential-*` scripts on `PATH`, against a registry with htpasswd auth. The
/// scenarios run in a child process (they need their own `DOCKER_CONFIG` and `PATH`).
#[test]
fn docker_credential_helpers() {
    let registry = Registry::start_with_auth("helperuser", "helperpass");
    let image = two_layer_image("credhelper");
    registry.push("viahelper", "latest", &image);
    let config_dir = tempfile::tempdir().expect("tmp");
    let bin = tempfile::tempdir().expect("tmp");
    let addr = registry.addr.as_str();
    common::fake_credential_helper(
        bin.path(),
        "kilntest",
        &[(addr, "helperuser", "helperpass")],
    );
    common::fake_credential_helper(bin.path(), "kilnwrong", &[(addr, "helperuser", "nope")]);
    common::fake_credential_helper(bin.path(), "kilnempty", &[]);
    let broken = bin.path().join("docker-credential-kilnbroken");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'the keychain is locked' >&2\nexit 3\n",
    )
    .expect("helper");
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    common::run_child_test(
        "docker_credential_helpers_child",
        config_dir.path(),
        bin.path(),
        &[
            ("KILN_TEST_PULL", &registry.reference("viahelper")),
            ("KILN_TEST_REGISTRY", addr),
        ],
    );
    // Asked with the registry's host:port, once per pull that named it.
    assert_eq!(
        common::helper_log(bin.path(), "kilntest"),
        vec![addr.to_string(), addr.to_string()]
    );
    assert_eq!(
        common::helper_log(bin.path(), "kilnempty"),
        vec![addr.to_string()]
    );
    assert_eq!(
        common::helper_log(bin.path(), "kilnwrong"),
        vec![addr.to_string()]
    );
}

#[test]
#[ignore = "run by docker_credential_helpers in a child process"]
fn docker_credential_helpers_child() {
    let reference = std::env::var("KILN_TEST_PULL").expect("KILN_TEST_PULL");
    let addr = std::env::var("KILN_TEST_REGISTRY").expect("KILN_TEST_REGISTRY");
    let config =
        std::path::PathBuf::from(std::env::var_os("DOCKER_CONFIG").expect("DOCKER_CONFIG"))
            .join("config.json");
    let pull = |cfg: serde_json::Value| {
        std::fs::write(&config, cfg.to_string()).expect("config.json");
        let (_dir, store) = store();
        store.pull(&reference, &quiet())
    };

    // The default helper; Docker leaves an empty `auths` entry beside it.
    pull(serde_json::json!({"credsStore": "kilntest", "auths": {&addr: {}}}))
        .expect("pull with credsStore");
    // A per-registry helper wins over the default one.
    pull(serde_json::json!({"credsStore": "kilnnosuch", "credHelpers": {&addr: "kilntest"}}))
        .expect("pull with credHelpers");

    // A helper that is not installed: an error naming it, the file, and what to do.
    let err = pull(serde_json::json!({"credsStore": "kilnnosuch"})).expect_err("missing helper");
    eprintln!("expected error: {err}");
    assert!(
        matches!(err, Error::CredentialHelperMissing { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("docker-credential-kilnnosuch"), "{text}");
    assert!(text.contains(&config.display().to_string()), "{text}");
    assert!(text.contains("install it"), "{text}");

    // A helper that knows nothing of the registry: the file's own entry, as in Docker.
    let auth = base64_encode(b"helperuser:helperpass");
    pull(serde_json::json!({
        "credHelpers": {&addr: "kilnempty"},
        "auths": {&addr: {"auth": auth}},
    }))
    .expect("pull with the auths entry after the helper found nothing");

    // A failing helper: its words reach the user.
    let err = pull(serde_json::json!({"credsStore": "kilnbroken"})).expect_err("broken helper");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::CredentialHelper { .. }), "{err}");
    assert!(err.to_string().contains("the keychain is locked"), "{err}");
    assert!(
        err.to_string().contains("docker-credential-kilnbroken"),
        "{err}"
    );

    // Wrong credentials from a helper are refused by the registry like any others.
    let err = pull(serde_json::json!({"credsStore": "kilnwrong"})).expect_err("wrong secret");
    assert!(matches!(err, Error::AuthFailed { .. }), "{err}");

    // Helpers for other registries only: anonymous, and no helper runs.
    let err = pull(serde_json::json!({"credHelpers": {"registry.example": "kilnbroken"}}))
        .expect_err("anonymous");
    assert!(matches!(err, Error::AuthRequired { .. }), "{err}");
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A pull process killed after its first layer finished and in the middle of its second:
/// the next pull does not download the first layer again, and asks only for the rest of the
/// second with a range request.
#[test]
fn killed_pull_resumes() {
    let registry = Registry::start();
    let mut big = LayerBuilder::new();
    big.file("big", 0o644, &common::random_bytes(6 << 20, 7))
        .expect("big file");
    let image = ImageBuilder::new()
        .layer(layer("small", Compression::Gzip))
        .layer(big.finish(Compression::None).expect("big layer"))
        .build()
        .expect("image");
    registry.push("killme", "latest", &image);
    // About 800 kB/s, and the link hangs after 5 MiB of a connection: the pull is still in
    // the middle of the big layer when it is killed, however loaded the host.
    let proxy = common::Proxy::start(
        &registry.addr,
        common::ProxyOptions {
            throttle: Some(std::time::Duration::from_millis(20)),
            stall_after: Some(5 << 20),
            ..common::ProxyOptions::default()
        },
    )
    .addr;
    let (dir, store) = store();
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "killed_pull_child",
            "--include-ignored",
            "--nocapture",
        ])
        .env("KILN_TEST_ROOT", dir.path())
        .env("KILN_TEST_PULL", format!("{proxy}/killme:latest"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting the child pull");
    let small = &image.layers[0].blob.digest;
    let big = &image.layers[1].blob.digest;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Killed once the small layer is stored and 2 of the big one's 6 MiB are recorded (the
    // pull checkpoints every second, so a record past 2 MiB comes before the 5 MiB hang).
    while !store.has_blob(small) || common::partial_synced(&store, big) < 2 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first layer and part of the second never arrived"
        );
        assert!(
            child.try_wait().expect("child status").is_none(),
            "the child pull ended before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("killing the pull");
    child.wait().expect("reaping the pull");
    assert!(
        !store.has_blob(big),
        "the big layer must still be in flight"
    );
    assert!(store.list().expect("list").is_empty());
    let kept = common::partial_synced(&store, big);
    let size = image.layers[1].blob.data.len() as u64;
    assert!((2 << 20..=5 << 20).contains(&kept), "{kept} of {size}");

    let counter = common::Proxy::start(&registry.addr, common::ProxyOptions::default());
    let record = store
        .pull(&format!("{}/killme:latest", counter.addr), &quiet())
        .expect("pull after the kill");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_eq!(
        registry.blob_gets("killme", small),
        1,
        "small layer fetched once"
    );
    assert_eq!(
        counter.blob_ranges(big),
        [Some(format!("bytes={kept}-"))],
        "the big layer resumed where the killed pull stopped"
    );
    let served = counter.served();
    eprintln!("big layer {size} bytes, killed at {kept}: the second pull transferred {served}");
    assert!(served < size - kept + (64 << 10), "{served} bytes");
    assert_eq!(
        file_digest(&store.blob_path(big).expect("path")),
        *big,
        "the resumed blob verifies"
    );
    assert!(common::partial_files(&store).is_empty());
    assert!(store.prune().is_ok());
    assert!(blob_files(&store).iter().all(|f| !f.starts_with('.')));
}

#[test]
#[ignore = "run by killed_pull_resumes in a child process"]
fn killed_pull_child() {
    let root = std::env::var("KILN_TEST_ROOT").expect("KILN_TEST_ROOT");
    let reference = std::env::var("KILN_TEST_PULL").expect("KILN_TEST_PULL");
    let store = kiln_image::Store::open(std::path::Path::new(&root)).expect("open");
    store.pull(&reference, &quiet()).expect("pull");
}
