//! Tests of the VM state store: lookups, names, listing, updates, and many threads and
//! processes writing to one database at once.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;

use kiln_engine::state::{
    validate_name, NewVm, StateError, StateStore, VmRecord, VmStatus, DB_FILE_NAME, SCHEMA_VERSION,
};

fn new_vm(name: Option<&str>) -> NewVm {
    NewVm {
        name: name.map(str::to_string),
        image: "docker.io/library/alpine:3.20".to_string(),
        image_digest: "sha256:1111111111111111111111111111111111111111111111111111111111111111"
            .to_string(),
        kernel: "6.1.102".to_string(),
        backend: "kiln-vmm".to_string(),
        spec: serde_json::json!({ "cmd": ["sh", "-c", "echo hi"], "cpus": 1, "n": 0 }),
        dir: PathBuf::from("/var/lib/kiln/vms/x"),
    }
}

fn temp_root() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temp dir")
}

fn open(root: &Path) -> StateStore {
    StateStore::open(root).expect("open the state store")
}

#[test]
fn create_then_get_by_full_id_short_prefix_and_name() {
    let root = temp_root();
    let store = open(root.path());
    let created = store.create(&new_vm(Some("web"))).expect("create");

    assert_eq!(created.id.len(), 64);
    assert!(created
        .id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(created.short_id(), &created.id[..12]);
    assert_eq!(created.name, "web");
    assert_eq!(created.status, VmStatus::Created);
    assert!(created.created_at > 1_600_000_000_000, "unix milliseconds");
    assert_eq!(created.started_at, None);
    assert_eq!(created.exit_code, None);

    assert_eq!(store.get(&created.id).expect("by full id"), created);
    assert_eq!(store.get(created.short_id()).expect("by short id"), created);
    assert_eq!(
        store.get(&created.id[..3]).expect("by 3-char prefix"),
        created
    );
    assert_eq!(
        store.get(&created.id[..1]).expect("by 1-char prefix"),
        created
    );
    assert_eq!(
        store
            .get(&created.id[..8].to_ascii_uppercase())
            .expect("by upper-case prefix"),
        created
    );
    assert_eq!(store.get("web").expect("by name"), created);

    // Everything round-trips, including the spec and a non-UTF-8 directory.
    let mut odd = new_vm(Some("odd"));
    odd.dir = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/vm-\xff\xfe"));
    let odd = store.create(&odd).expect("create odd");
    let back = store.get("odd").expect("get odd");
    assert_eq!(back.dir, odd.dir);
    assert_eq!(back.spec, new_vm(None).spec);

    for missing in ["nope", "", "zz", &"f".repeat(65)] {
        match store.get(missing) {
            Err(StateError::NotFound(key)) => assert_eq!(key, missing),
            other => panic!("get({missing:?}) gave {other:?}, expected NotFound"),
        }
    }
}

#[test]
fn reopening_the_store_finds_the_same_records() {
    let root = temp_root();
    let created = open(root.path())
        .create(&new_vm(Some("keep")))
        .expect("create");
    let reopened = open(root.path());
    assert_eq!(reopened.get("keep").expect("get after reopen"), created);
}

#[test]
fn ambiguous_prefix_is_an_error_listing_the_matches() {
    let root = temp_root();
    let store = open(root.path());
    // 17 IDs over 16 possible first characters: at least two share one.
    let records: Vec<VmRecord> = (0..17)
        .map(|_| store.create(&new_vm(None)).expect("create"))
        .collect();
    let shared = (0..16u32)
        .map(|d| char::from_digit(d, 16).expect("hex digit").to_string())
        .find(|c| {
            records
                .iter()
                .filter(|r| r.id.starts_with(c.as_str()))
                .count()
                >= 2
        })
        .expect("pigeonhole: some first character is shared");
    let expected: HashSet<String> = records
        .iter()
        .filter(|r| r.id.starts_with(&shared))
        .map(|r| r.short_id().to_string())
        .collect();

    let err = store.get(&shared).expect_err("prefix is ambiguous");
    let message = err.to_string();
    match err {
        StateError::Ambiguous { prefix, matches } => {
            assert_eq!(prefix, shared);
            assert_eq!(matches.iter().cloned().collect::<HashSet<_>>(), expected);
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert!(
        message.contains(&format!("matches {} VMs", expected.len())),
        "{message}"
    );
    for short in &expected {
        assert!(message.contains(short.as_str()), "{message}");
    }
    // The same prefix also refuses update and remove, rather than picking one.
    assert!(matches!(
        store.update(&shared, |_| {}),
        Err(StateError::Ambiguous { .. })
    ));
    assert!(matches!(
        store.remove(&shared),
        Err(StateError::Ambiguous { .. })
    ));
    assert_eq!(store.list(true).expect("list").len(), 17);
}

#[test]
fn name_wins_over_an_id_prefix_that_spells_it() {
    let root = temp_root();
    let store = open(root.path());
    let first = store.create(&new_vm(None)).expect("create");
    let prefix = first.id[..4].to_string();
    let named = store
        .create(&new_vm(Some(&prefix)))
        .expect("a hex name is valid");
    assert_eq!(store.get(&prefix).expect("get").id, named.id);
    // A longer prefix still finds the first VM.
    assert_eq!(store.get(&first.id[..6]).expect("get").id, first.id);
}

#[test]
fn invalid_names_are_refused_with_clear_errors() {
    let root = temp_root();
    let store = open(root.path());
    let too_long = "a".repeat(65);
    for (bad, hint) in [
        ("", "cannot be empty"),
        ("-web", "must start with a letter or digit"),
        (".web", "must start with a letter or digit"),
        ("_web", "must start with a letter or digit"),
        ("my web", "' ' is not allowed"),
        ("web/1", "'/' is not allowed"),
        ("wéb", "'é' is not allowed"),
        ("web;rm", "';' is not allowed"),
        (too_long.as_str(), "at most 64 characters"),
    ] {
        let err = store
            .create(&new_vm(Some(bad)))
            .expect_err("invalid name refused");
        let message = err.to_string();
        assert!(
            matches!(&err, StateError::InvalidName { name, .. } if name == bad),
            "{bad:?}: {err:?}"
        );
        assert!(
            message.starts_with(&format!("invalid VM name {bad:?}: ")),
            "{message}"
        );
        assert!(message.contains(hint), "{bad:?}: {message}");
        assert!(validate_name(bad).is_err());
    }
    for good in ["a", "7", "web-1.prod_x", "A.b-C_d", &"z".repeat(64)] {
        store
            .create(&new_vm(Some(good)))
            .unwrap_or_else(|e| panic!("{good:?} should be accepted: {e}"));
    }
    // Nothing was recorded for the refused names.
    assert_eq!(store.list(true).expect("list").len(), 5);
}

#[test]
fn name_in_use_is_refused_naming_the_holder() {
    let root = temp_root();
    let store = open(root.path());
    let web = store.create(&new_vm(Some("web"))).expect("create");
    let err = store
        .create(&new_vm(Some("web")))
        .expect_err("duplicate refused");
    assert_eq!(
        err.to_string(),
        format!(
            "the name \"web\" is already used by VM {}; remove it (kiln rm web) or choose another name",
            web.short_id()
        )
    );
    match err {
        StateError::NameInUse { name, id } => {
            assert_eq!(name, "web");
            assert_eq!(id, web.id);
        }
        other => panic!("expected NameInUse, got {other:?}"),
    }
    // Names are case-sensitive, like Docker's.
    store
        .create(&new_vm(Some("Web")))
        .expect("other case is another name");
    // Once removed, the name is free again.
    store.remove("web").expect("remove");
    store.create(&new_vm(Some("web"))).expect("name free again");
}

#[test]
fn generated_names_are_unique_and_valid() {
    let root = temp_root();
    let store = open(root.path());
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    let mut shorts = HashSet::new();
    // 300 out of 2500 adjective_noun pairs: collisions are near certain and must be retried.
    for _ in 0..300 {
        let record = store.create(&new_vm(None)).expect("create");
        validate_name(&record.name).expect("generated name is valid");
        let (adjective, noun) = record.name.split_once('_').expect("adjective_noun");
        assert!(!adjective.is_empty() && !noun.is_empty(), "{}", record.name);
        assert!(
            names.insert(record.name.clone()),
            "duplicate {}",
            record.name
        );
        assert!(ids.insert(record.id.clone()));
        assert!(shorts.insert(record.short_id().to_string()));
        assert!(
            !record.short_id().bytes().all(|b| b.is_ascii_digit()),
            "all-digit short id"
        );
    }
}

#[test]
fn list_without_all_shows_only_active_vms_newest_first() {
    let root = temp_root();
    let store = open(root.path());
    let names = ["c0", "s1", "r2", "p3", "e4", "r5"];
    for name in names {
        store.create(&new_vm(Some(name))).expect("create");
    }
    store.set_status("s1", VmStatus::Starting).expect("status");
    store.set_status("r2", VmStatus::Running).expect("status");
    store.set_status("p3", VmStatus::Stopping).expect("status");
    store.set_status("e4", VmStatus::Exited).expect("status");
    store.set_status("r5", VmStatus::Running).expect("status");

    let active: Vec<String> = store
        .list(false)
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(active, ["r5", "p3", "r2", "s1"]);

    let all: Vec<String> = store
        .list(true)
        .expect("list -a")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(all, ["r5", "e4", "p3", "r2", "s1", "c0"]);

    // Order is creation order, not last-update order.
    store.set_status("c0", VmStatus::Running).expect("status");
    let active: Vec<String> = store
        .list(false)
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(active, ["r5", "p3", "r2", "s1", "c0"]);
}

#[test]
fn update_is_atomic_under_concurrent_read_modify_write() {
    let root = temp_root();
    let id = open(root.path())
        .create(&new_vm(Some("counter")))
        .expect("create")
        .id;
    let threads = 8;
    let per_thread = 25;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let root = root.path().to_path_buf();
            let id = id.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let store = open(&root);
                barrier.wait();
                for _ in 0..per_thread {
                    store
                        .update(&id, |record| {
                            let n = record.spec["n"].as_u64().expect("n is a number");
                            // Widen the window between read and write.
                            thread::yield_now();
                            record.spec["n"] = serde_json::json!(n + 1);
                        })
                        .expect("update");
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("thread");
    }
    let record = open(root.path()).get(&id).expect("get");
    assert_eq!(record.spec["n"], serde_json::json!(threads * per_thread));
}

#[test]
fn update_changes_fields_and_refuses_identity_changes() {
    let root = temp_root();
    let store = open(root.path());
    let vm = store.create(&new_vm(Some("alpha"))).expect("create");
    store.create(&new_vm(Some("bravo"))).expect("create");

    let updated = store
        .update("alpha", |r| {
            r.supervisor_pid = Some(4242);
            r.vmm_pid = Some(4243);
            r.status_reason = Some("booting".to_string());
            r.name = "renamed".to_string();
        })
        .expect("update");
    assert_eq!(store.get(&vm.id).expect("get"), updated);
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.supervisor_pid, Some(4242));
    assert!(matches!(store.get("alpha"), Err(StateError::NotFound(_))));

    let before = store.get(&vm.id).expect("get");
    assert!(matches!(
        store.update(&vm.id, |r| r.name = "bravo".to_string()),
        Err(StateError::NameInUse { .. })
    ));
    assert!(matches!(
        store.update(&vm.id, |r| r.name = "no spaces".to_string()),
        Err(StateError::InvalidName { .. })
    ));
    assert!(matches!(
        store.update(&vm.id, |r| r.id = "0".repeat(64)),
        Err(StateError::Immutable { field: "id", .. })
    ));
    assert!(matches!(
        store.update(&vm.id, |r| r.created_at += 1),
        Err(StateError::Immutable {
            field: "created_at",
            ..
        })
    ));
    // Refused updates wrote nothing.
    assert_eq!(store.get(&vm.id).expect("get"), before);
    assert!(matches!(
        store.update("missing", |_| {}),
        Err(StateError::NotFound(_))
    ));
}

#[test]
fn set_status_stamps_started_and_finished_times() {
    let root = temp_root();
    let store = open(root.path());
    let vm = store.create(&new_vm(None)).expect("create");

    store
        .set_status(&vm.id, VmStatus::Starting)
        .expect("starting");
    store
        .update(&vm.id, |r| {
            r.supervisor_pid = Some(100);
            r.vmm_pid = Some(101);
        })
        .expect("pids");
    let starting = store.get(&vm.id).expect("get");
    assert_eq!(starting.status, VmStatus::Starting);
    assert_eq!(starting.started_at, None);

    store
        .set_status(&vm.id, VmStatus::Running)
        .expect("running");
    let running = store.get(&vm.id).expect("get");
    let started = running.started_at.expect("started_at stamped");
    assert!(started >= vm.created_at);
    assert_eq!(running.supervisor_pid, Some(100));

    store
        .update(&vm.id, |r| {
            r.transition(VmStatus::Exited, kiln_engine::state::now_ms());
            r.exit_code = Some(7);
            r.status_reason = Some("exited (7)".to_string());
        })
        .expect("exited");
    let exited = store.get(&vm.id).expect("get");
    assert_eq!(exited.status, VmStatus::Exited);
    assert!(exited.finished_at.expect("finished_at stamped") >= started);
    assert_eq!(exited.exit_code, Some(7));
    assert_eq!(exited.status_reason.as_deref(), Some("exited (7)"));
    assert_eq!(exited.supervisor_pid, None, "dead pids are forgotten");
    assert_eq!(exited.vmm_pid, None);

    // A restart clears the previous run's outcome.
    store
        .set_status(&vm.id, VmStatus::Starting)
        .expect("restart");
    let restarted = store.get(&vm.id).expect("get");
    assert_eq!(restarted.exit_code, None);
    assert_eq!(restarted.status_reason, None);
    assert_eq!(restarted.finished_at, None);
    assert_eq!(restarted.started_at, Some(started));
}

#[test]
fn remove_then_get_is_not_found() {
    let root = temp_root();
    let store = open(root.path());
    let vm = store.create(&new_vm(Some("gone"))).expect("create");
    let other = store.create(&new_vm(Some("stays"))).expect("create");
    store.remove(vm.short_id()).expect("remove by short id");
    let err = store.get(&vm.id).expect_err("removed");
    assert!(matches!(&err, StateError::NotFound(key) if *key == vm.id));
    assert_eq!(
        store.get("gone").expect_err("removed").to_string(),
        "no such VM: \"gone\" (kiln ps -a lists them)"
    );
    assert!(matches!(store.remove("gone"), Err(StateError::NotFound(_))));
    assert_eq!(store.list(true).expect("list"), vec![other]);
}

#[test]
fn schema_version_wal_and_permissions_are_set() {
    use std::os::unix::fs::PermissionsExt;

    let parent = temp_root();
    let root = parent.path().join("kiln");
    let store = open(&root);
    assert_eq!(store.db_path(), root.join(DB_FILE_NAME));
    drop(store);

    let conn = rusqlite::Connection::open(root.join(DB_FILE_NAME)).expect("open db");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("user_version");
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(version, 2);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");

    let dir_mode = std::fs::metadata(&root)
        .expect("stat root")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let db_mode = std::fs::metadata(root.join(DB_FILE_NAME))
        .expect("stat db")
        .permissions()
        .mode();
    assert_eq!(db_mode & 0o777, 0o600);
}

#[test]
fn a_newer_schema_is_refused() {
    let root = temp_root();
    drop(open(root.path()));
    let conn = rusqlite::Connection::open(root.path().join(DB_FILE_NAME)).expect("open db");
    conn.pragma_update(None, "user_version", 99)
        .expect("set user_version");
    drop(conn);
    let err = StateStore::open(root.path()).expect_err("newer schema refused");
    assert!(
        matches!(
            err,
            StateError::NewerSchema {
                found: 99,
                supported: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[test]
fn status_words_round_trip() {
    for status in VmStatus::ALL {
        let word = status.to_string();
        assert_eq!(word, word.to_lowercase());
        assert_eq!(word.parse::<VmStatus>().expect("parse"), status);
        assert_eq!(
            serde_json::to_value(status).expect("serialize"),
            serde_json::json!(word)
        );
    }
    assert_eq!(VmStatus::Running.to_string(), "running");
    assert!("Running".parse::<VmStatus>().is_err());
    assert!("paused".parse::<VmStatus>().is_err());
    assert!(VmStatus::Stopping.is_active());
    assert!(!VmStatus::Exited.is_active());
    assert!(!VmStatus::Created.is_active());
}

#[test]
fn to_json_has_every_field_and_the_short_id() {
    let root = temp_root();
    let store = open(root.path());
    let vm = store.create(&new_vm(Some("js"))).expect("create");
    let json = vm.to_json();
    assert_eq!(json["id"], serde_json::json!(vm.id));
    assert_eq!(json["short_id"], serde_json::json!(vm.short_id()));
    assert_eq!(json["name"], "js");
    assert_eq!(json["status"], "created");
    assert_eq!(json["dir"], "/var/lib/kiln/vms/x");
    assert_eq!(json["spec"]["cpus"], 1);
    assert_eq!(json["created_at"], serde_json::json!(vm.created_at));
    assert!(json["exit_code"].is_null());
    assert!(json["started_at"].is_null());
    for key in [
        "image",
        "image_digest",
        "kernel",
        "backend",
        "status_reason",
        "supervisor_pid",
        "vmm_pid",
        "finished_at",
    ] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
}

#[test]
fn concurrent_stores_in_threads_create_200_distinct_records() {
    let root = temp_root();
    let threads = 8;
    let per_thread = 25;
    // All threads open the (not yet existing) database at once, then create at once.
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let root = root.path().to_path_buf();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let store = open(&root);
                (0..per_thread)
                    .map(|i| {
                        // Every other VM gets a generated name, to race the generator too.
                        let name = (i % 2 == 0).then(|| format!("t{t}-vm{i}"));
                        store
                            .create(&new_vm(name.as_deref()))
                            .unwrap_or_else(|e| panic!("thread {t} create {i}: {e}"))
                            .id
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for handle in handles {
        for id in handle.join().expect("thread") {
            assert!(ids.insert(id), "duplicate id");
        }
    }
    assert_eq!(ids.len(), threads * per_thread);
    let records = open(root.path()).list(true).expect("list");
    assert_eq!(records.len(), threads * per_thread);
    let names: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.len(), records.len(), "names are distinct");
    let shorts: HashSet<&str> = records.iter().map(|r| r.short_id()).collect();
    assert_eq!(shorts.len(), records.len(), "short ids are distinct");
    assert_eq!(
        records.iter().map(|r| r.id.clone()).collect::<HashSet<_>>(),
        ids
    );
}

#[test]
fn racing_creators_of_one_name_exactly_one_wins() {
    let root = temp_root();
    drop(open(root.path()));
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let root = root.path().to_path_buf();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let store = open(&root);
                barrier.wait();
                store.create(&new_vm(Some("contested")))
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let winners: Vec<&VmRecord> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner = winners[0];
    for result in &results {
        match result {
            Ok(_) => {}
            Err(StateError::NameInUse { name, id }) => {
                assert_eq!(name, "contested");
                assert_eq!(*id, winner.id);
            }
            Err(other) => panic!("expected NameInUse, got {other:?}"),
        }
    }
    assert_eq!(
        open(root.path()).list(true).expect("list"),
        vec![winner.clone()]
    );
}

const WRITER_ROOT_ENV: &str = "KILN_STATE_TEST_WRITER_ROOT";
const WRITER_TAG_ENV: &str = "KILN_STATE_TEST_WRITER_TAG";
const WRITES_PER_PROCESS: usize = 25;

/// Not a test of its own: the body of the writer processes that
/// `concurrent_processes_create_records` starts (this test binary, filtered to this test, with
/// the environment naming the kiln root). Without that environment it does nothing.
#[test]
fn process_writer_child() {
    let Some(root) = std::env::var_os(WRITER_ROOT_ENV) else {
        return;
    };
    let tag = std::env::var(WRITER_TAG_ENV).expect("writer tag");
    let store = open(Path::new(&root));
    for i in 0..WRITES_PER_PROCESS {
        store
            .create(&new_vm(Some(&format!("p{tag}-vm{i}"))))
            .unwrap_or_else(|e| panic!("process {tag} create {i}: {e}"));
        // Contended read-modify-write across processes as well.
        store
            .update(&format!("p{tag}-vm{i}"), |r| {
                r.spec["n"] = serde_json::json!(i)
            })
            .unwrap_or_else(|e| panic!("process {tag} update {i}: {e}"));
    }
}

#[test]
fn concurrent_processes_create_records() {
    let root = temp_root();
    let exe = std::env::current_exe().expect("test binary path");
    let processes = 4;
    let children: Vec<_> = (0..processes)
        .map(|p| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "process_writer_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(WRITER_ROOT_ENV, root.path())
                .env(WRITER_TAG_ENV, p.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn writer process")
        })
        .collect();
    // This process writes at the same time.
    let store = open(root.path());
    for i in 0..WRITES_PER_PROCESS {
        store
            .create(&new_vm(Some(&format!("parent-vm{i}"))))
            .expect("parent create");
    }
    for (p, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().expect("wait for writer");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "writer {p} failed: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("1 passed"),
            "writer {p} did not run its test:\n{stdout}"
        );
    }
    let records = store.list(true).expect("list");
    assert_eq!(records.len(), (processes + 1) * WRITES_PER_PROCESS);
    let names: HashSet<String> = records.iter().map(|r| r.name.clone()).collect();
    for i in 0..WRITES_PER_PROCESS {
        assert!(names.contains(&format!("parent-vm{i}")));
        for p in 0..processes {
            let name = format!("p{p}-vm{i}");
            assert!(names.contains(&name), "missing {name}");
            assert_eq!(
                store.get(&name).expect("get").spec["n"],
                serde_json::json!(i)
            );
        }
    }
}
