//! The VM state store: one SQLite database, `<kiln_root>/state.db`, holding a record for every
//! VM kiln knows about.
//!
//! Any number of processes use it at once: `kiln` commands run by the user (often several in
//! parallel from scripts) and one supervisor process per running VM. So:
//!
//! - the database is in WAL mode (readers never block the writer, nor the writer readers), with
//!   `synchronous=NORMAL` (durable across a kiln crash; a power cut may lose the last commits,
//!   which only describe VMs that died with the machine anyway) and a busy timeout of
//!   [`BUSY_TIMEOUT`], so a process that finds the database locked waits instead of failing;
//! - every change is one short transaction, and every read-then-write (name uniqueness,
//!   [`StateStore::update`]) runs in a `BEGIN IMMEDIATE` transaction, which takes the write lock
//!   up front: two processes can never both read the old state and both write;
//! - no transaction is held across anything slow (a VM boot, a user prompt): callers read a
//!   [`VmRecord`], act, then write what happened.
//!
//! The schema is versioned with `PRAGMA user_version`; [`StateStore::open`] migrates an older
//! database and refuses a newer one (written by a newer kiln) rather than misreading it.

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, ToSql, Transaction,
    TransactionBehavior,
};
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The schema version this kiln writes and understands (`PRAGMA user_version`). Bump it with a
/// new step in `migrate` whenever the schema changes, so older databases are upgraded in place.
pub const SCHEMA_VERSION: i64 = 2;

/// The database's file name inside the kiln root, so tools and tests can find it.
pub const DB_FILE_NAME: &str = "state.db";

/// How long a process waits for another one's write transaction before giving up. Writes are
/// milliseconds long, so reaching this means something is badly wrong (a hung process holding
/// the lock), and the user is better served by an error than by a hang.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many characters of an ID `kiln ps` shows and users type: Docker's convention, which the
/// store keeps unique (see [`StateStore::create`]).
pub const SHORT_ID_LEN: usize = 12;

/// The longest name a VM can have (Docker's limit).
pub const MAX_NAME_LEN: usize = 64;

/// Everything that can go wrong with the state store; each message says what the user can do
/// about it.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A user-chosen name breaks Docker's rule `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}`; names appear
    /// in paths, host names and shell commands, so anything else is refused.
    #[error("invalid VM name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Which part of the rule it breaks.
        reason: String,
    },
    /// Another VM already has this name.
    #[error(
        "the name {name:?} is already used by VM {}; remove it (kiln rm {name}) or choose another name",
        short(.id)
    )]
    NameInUse {
        /// The name asked for.
        name: String,
        /// The full ID of the VM that holds it.
        id: String,
    },
    /// No VM has this ID, ID prefix or name.
    #[error("no such VM: {0:?} (kiln ps -a lists them)")]
    NotFound(String),
    /// An ID prefix matches more than one VM (and no VM has it as its name).
    #[error(
        "the ID prefix {prefix:?} matches {} VMs ({}); give more characters of the ID, or the name",
        .matches.len(),
        .matches.join(", ")
    )]
    Ambiguous {
        /// The prefix given.
        prefix: String,
        /// The short IDs of the VMs it matches.
        matches: Vec<String>,
    },
    /// An [`StateStore::update`] closure changed a field that identifies the record; that is a
    /// bug in the caller, refused so that it cannot corrupt the store.
    #[error("a VM's {field} cannot be changed (VM {})", short(.id))]
    Immutable {
        /// The field the closure changed.
        field: &'static str,
        /// The VM's full ID.
        id: String,
    },
    /// A stored record cannot be read back (edited by hand, or written by a buggy kiln).
    #[error("the state database has a damaged record for VM {id}: {reason}")]
    Corrupt {
        /// The record's ID.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No unused ID or generated name could be found after many random tries (a broken random
    /// source, or an absurd number of VMs).
    #[error("{0}")]
    Exhausted(String),
    /// The database was written by a newer kiln whose schema this one does not know.
    #[error(
        "the state database {} has schema version {found}, but this kiln only understands up to \
         version {supported}; use the newer kiln (or move the database away to start afresh)",
        .path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
    },
    /// Another process held the database's write lock for longer than [`BUSY_TIMEOUT`].
    #[error(
        "the state database stayed locked by another kiln process for over {}s while {context}; \
         try again (a hung kiln process may be holding it)",
        BUSY_TIMEOUT.as_secs()
    )]
    Busy {
        /// What this process was doing.
        context: String,
    },
    /// Any other SQLite failure, with what the store was doing. The SQLite error is part of the
    /// message (not a separate `source`), so `{:#}` chains do not print it twice.
    #[error("state database error while {context}: {error}")]
    Sqlite {
        /// What the store was doing.
        context: String,
        /// SQLite's error.
        error: rusqlite::Error,
    },
    /// An I/O error on a named path (creating the kiln root or the database file, reading
    /// random bytes).
    #[error("{context} {}: {error}", .path.display())]
    Io {
        /// What the store was doing.
        context: String,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
}

impl From<rusqlite::Error> for StateError {
    /// Lets `?` work on bare rusqlite results (for callers building on the store); the store
    /// itself always says what it was doing instead.
    fn from(error: rusqlite::Error) -> Self {
        sqlite_error("using the state database", error)
    }
}

/// Wraps a rusqlite error with what the store was doing, turning lock timeouts into the
/// friendlier [`StateError::Busy`].
fn sqlite_error(context: &str, error: rusqlite::Error) -> StateError {
    if is_busy(&error) {
        StateError::Busy {
            context: context.to_string(),
        }
    } else {
        StateError::Sqlite {
            context: context.to_string(),
            error,
        }
    }
}

/// Whether an error means "another connection holds a lock".
fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// `.ctx("doing X")` on rusqlite results: the store's one way of turning them into
/// [`StateError`]s, so every message says what failed.
trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, StateError>;
}

impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, context: &str) -> Result<T, StateError> {
        self.map_err(|e| sqlite_error(context, e))
    }
}

/// The first [`SHORT_ID_LEN`] characters of an ID (all of it if shorter), for messages.
fn short(id: &str) -> &str {
    id.get(..SHORT_ID_LEN).unwrap_or(id)
}

/// Where a VM is in its life. Stored as lowercase TEXT, shown by `kiln ps` as-is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// Recorded (directory, spec) but never started.
    Created,
    /// The supervisor is booting it.
    Starting,
    /// The guest is up.
    Running,
    /// A stop was asked for and is under way.
    Stopping,
    /// It has stopped; `exit_code` / `status_reason` say how.
    Exited,
}

impl VmStatus {
    /// Every status, for help texts and filters.
    pub const ALL: [VmStatus; 5] = [
        VmStatus::Created,
        VmStatus::Starting,
        VmStatus::Running,
        VmStatus::Stopping,
        VmStatus::Exited,
    ];

    /// The lowercase word stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Created => "created",
            VmStatus::Starting => "starting",
            VmStatus::Running => "running",
            VmStatus::Stopping => "stopping",
            VmStatus::Exited => "exited",
        }
    }

    /// Whether a VM in this status has (or is about to have, or is still winding down) a
    /// supervisor: what `kiln ps` without `-a` lists.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmStatus::Starting | VmStatus::Running | VmStatus::Stopping
        )
    }
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of the [`VmStatus`] words (e.g. in `kiln ps --filter status=`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown VM status {0:?} (expected one of: created, starting, running, stopping, exited)")]
pub struct ParseVmStatusError(pub String);

impl FromStr for VmStatus {
    type Err = ParseVmStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ParseVmStatusError(s.to_string()))
    }
}

impl ToSql for VmStatus {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(
            self.as_str().as_bytes(),
        )))
    }
}

/// What [`StateStore::create`] needs to record a new VM; everything else (ID, status,
/// timestamps) the store fills in.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVm {
    /// The name the user asked for (`--name`), or `None` for a generated `adjective_noun` one.
    pub name: Option<String>,
    /// The image reference as the user wrote it (shown by `kiln ps`).
    pub image: String,
    /// The image's manifest digest, so the VM keeps running the same image after a re-tag.
    pub image_digest: String,
    /// The kernel used (name, version or path, as the kernel module reports it).
    pub kernel: String,
    /// The hypervisor backend that runs it.
    pub backend: String,
    /// The full run spec; opaque to the store, which keeps it as JSON text.
    pub spec: serde_json::Value,
    /// The VM's own directory (disks, sockets, logs).
    pub dir: PathBuf,
}

/// One VM as stored: what `kiln ps` lists, `kiln inspect` prints and supervisors update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// 64 lowercase hex characters, unique; its first [`SHORT_ID_LEN`] are unique too.
    pub id: String,
    /// Unique name, user-chosen or generated.
    pub name: String,
    /// The image reference as the user wrote it.
    pub image: String,
    /// The image's manifest digest.
    pub image_digest: String,
    /// The kernel used.
    pub kernel: String,
    /// The hypervisor backend.
    pub backend: String,
    /// The full run spec, as given to [`StateStore::create`] or set by an update.
    pub spec: serde_json::Value,
    /// The VM's directory.
    #[serde(serialize_with = "serialize_path_lossy")]
    pub dir: PathBuf,
    /// Where the VM is in its life.
    pub status: VmStatus,
    /// The guest workload's exit code, once known.
    pub exit_code: Option<i32>,
    /// Why the VM is in its status, in words for `kiln ps` / `kiln inspect`: e.g.
    /// "exited (7)", "killed by signal 9", "supervisor died (pid 123)".
    pub status_reason: Option<String>,
    /// The per-VM supervisor process, while there is one.
    pub supervisor_pid: Option<u32>,
    /// The VMM (hypervisor) process, while there is one.
    pub vmm_pid: Option<u32>,
    /// When the record was created, in Unix milliseconds.
    pub created_at: u64,
    /// When the VM last reached [`VmStatus::Running`], in Unix milliseconds.
    pub started_at: Option<u64>,
    /// When the VM last reached [`VmStatus::Exited`], in Unix milliseconds.
    pub finished_at: Option<u64>,
}

/// Serializes a path as a string even when it is not UTF-8 (replacing the bad bytes), so that
/// [`VmRecord::to_json`] cannot fail; the database itself keeps the exact bytes.
fn serialize_path_lossy<S: Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.to_string_lossy())
}

impl VmRecord {
    /// The first 12 characters of the ID, as `kiln ps` shows it (Docker's convention); unique
    /// among the VMs in the store.
    pub fn short_id(&self) -> &str {
        short(&self.id)
    }

    /// The record as JSON for `kiln inspect` and `kiln ps --format json`: the serialized fields
    /// plus `short_id`, so scripts need not cut the ID themselves.
    pub fn to_json(&self) -> serde_json::Value {
        // Serializing cannot fail: every field is a string, number, enum or JSON value, and the
        // path is serialized lossily.
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(map) = &mut value {
            map.insert(
                "short_id".to_string(),
                serde_json::Value::String(self.short_id().to_string()),
            );
        }
        value
    }

    /// Moves the record to `status` and stamps what goes with it, as [`StateStore::set_status`]
    /// does; call it inside [`StateStore::update`] to change the status together with other
    /// fields (exit code, reason) in one transaction.
    ///
    /// - `Starting`: a new run begins, so the previous run's `exit_code`, `status_reason` and
    ///   `finished_at` are cleared.
    /// - `Running`: `started_at` is set to `now_ms`.
    /// - `Exited`: `finished_at` is set to `now_ms`, and the process IDs are cleared: those
    ///   processes are gone, and a stale PID could later name an unrelated process.
    ///
    /// Transitions are not policed: the store records what supervisors report.
    pub fn transition(&mut self, status: VmStatus, now_ms: u64) {
        match status {
            VmStatus::Starting => {
                self.exit_code = None;
                self.status_reason = None;
                self.finished_at = None;
            }
            VmStatus::Running => self.started_at = Some(now_ms),
            VmStatus::Exited => {
                self.finished_at = Some(now_ms);
                self.supervisor_pid = None;
                self.vmm_pid = None;
            }
            VmStatus::Created | VmStatus::Stopping => {}
        }
        self.status = status;
    }
}

/// The current time in Unix milliseconds, the unit of every timestamp in the store.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks a user-chosen VM name against Docker's rule `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}`, so the
/// CLI can refuse a bad `--name` before doing any work.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    let invalid = |reason: String| StateError::InvalidName {
        name: name.to_string(),
        reason,
    };
    let Some(first) = name.chars().next() else {
        return Err(invalid("a name cannot be empty".to_string()));
    };
    if !first.is_ascii_alphanumeric() {
        return Err(invalid(format!(
            "a name must start with a letter or digit, not {first:?}"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(invalid(format!(
            "the character {bad:?} is not allowed; use letters, digits, '_', '.' and '-'"
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "a name can have at most {MAX_NAME_LEN} characters, this one has {}",
            name.len()
        )));
    }
    Ok(())
}

/// Schema version 1. `seq` orders records by creation (newest first in `kiln ps`) even within
/// one millisecond; `short_id` is stored so its uniqueness is a constraint, not a hope; `dir` is
/// TEXT when the path is UTF-8 (readable with the sqlite3 shell) and a BLOB of its exact bytes
/// otherwise.
const SCHEMA_V1: &str = "
CREATE TABLE vms (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE CHECK (length(id) = 64),
    short_id       TEXT    NOT NULL UNIQUE CHECK (short_id = substr(id, 1, 12)),
    name           TEXT    NOT NULL UNIQUE,
    image          TEXT    NOT NULL,
    image_digest   TEXT    NOT NULL,
    kernel         TEXT    NOT NULL,
    backend        TEXT    NOT NULL,
    spec           TEXT    NOT NULL CHECK (json_valid(spec)),
    dir            TEXT    NOT NULL,
    status         TEXT    NOT NULL
        CHECK (status IN ('created', 'starting', 'running', 'stopping', 'exited')),
    exit_code      INTEGER,
    status_reason  TEXT,
    supervisor_pid INTEGER,
    vmm_pid        INTEGER,
    created_at     INTEGER NOT NULL,
    started_at     INTEGER,
    finished_at    INTEGER
);
CREATE INDEX vms_status ON vms (status);
";

/// Schema version 2: network address leases (bridge networking). The primary key makes an
/// address belong to one VM at most; the cascade releases it with the VM's record.
const SCHEMA_V2: &str = "
CREATE TABLE leases (
    address TEXT NOT NULL PRIMARY KEY,
    vm_id   TEXT NOT NULL UNIQUE REFERENCES vms (id) ON DELETE CASCADE
);
";

/// The columns every record query selects, in the order [`read_row`] reads them.
const COLUMNS: &str = "id, name, image, image_digest, kernel, backend, spec, dir, status, \
                       exit_code, status_reason, supervisor_pid, vmm_pid, created_at, \
                       started_at, finished_at";

/// Handle on the state database. Each process (or thread) opens its own: the store's
/// consistency comes from SQLite's locking, not from sharing one handle. A `StateStore` can be
/// moved between threads but not shared by them (`Send`, not `Sync`).
pub struct StateStore {
    conn: Connection,
    path: PathBuf,
}

impl fmt::Debug for StateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// Opens (creating if need be) `<kiln_root>/state.db`: creates the kiln root with mode 0700
    /// and the database file with mode 0600 (it lists every VM's spec, which may hold
    /// secrets), switches it to WAL, and migrates the schema to [`SCHEMA_VERSION`]. Safe to
    /// call from many processes at once, on a database that does not exist yet too.
    pub fn open(kiln_root: &Path) -> Result<StateStore, StateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(kiln_root)
            .map_err(|error| StateError::Io {
                context: "creating the kiln root".to_string(),
                path: kiln_root.to_path_buf(),
                error,
            })?;
        let path = kiln_root.join(DB_FILE_NAME);
        // Create the file ourselves so it gets mode 0600; SQLite gives its -wal and -shm files
        // the same mode. An empty file is a valid empty database.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|error| StateError::Io {
                context: "creating the state database".to_string(),
                path: path.clone(),
                error,
            })?;
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .ctx("opening the state database")?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .ctx("setting the busy timeout")?;
        let store = StateStore { conn, path };
        // Switching a fresh database to WAL needs an exclusive lock, which SQLite does not wait
        // for through the busy handler; when many processes open a new database at once, retry.
        let deadline = Instant::now() + BUSY_TIMEOUT;
        loop {
            match store.configure().and_then(|()| store.migrate()) {
                Ok(()) => return Ok(store),
                Err(StateError::Busy { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5 + random_below(20)));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The database file, for messages and diagnostics.
    pub fn db_path(&self) -> &Path {
        &self.path
    }

    /// Per-connection settings (WAL is stored in the file, the others are per connection).
    fn configure(&self) -> Result<(), StateError> {
        let mode: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .ctx("switching the state database to WAL mode")?;
        if !mode.eq_ignore_ascii_case("wal") {
            // E.g. a file system without shared memory: still correct, just less concurrent.
            tracing::warn!(
                path = %self.path.display(),
                journal_mode = %mode,
                "the state database could not use WAL mode; concurrent kiln commands will wait more"
            );
        }
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .ctx("setting synchronous=NORMAL")?;
        self.conn
            .pragma_update(None, "foreign_keys", "ON")
            .ctx("enabling foreign keys")?;
        Ok(())
    }

    /// Brings the schema to [`SCHEMA_VERSION`]: each step runs in one IMMEDIATE transaction
    /// with the version check, so concurrent openers migrate exactly once.
    fn migrate(&self) -> Result<(), StateError> {
        let current = self.user_version()?;
        if current == SCHEMA_VERSION {
            return Ok(());
        }
        if current > SCHEMA_VERSION {
            return Err(self.newer_schema(current));
        }
        let tx = self.immediate("migrating the state database")?;
        let current = self.user_version()?;
        if current > SCHEMA_VERSION {
            return Err(self.newer_schema(current));
        }
        if current < 1 {
            tx.execute_batch(SCHEMA_V1)
                .ctx("creating the state database schema (version 1)")?;
        }
        if current < 2 {
            tx.execute_batch(SCHEMA_V2)
                .ctx("adding address leases to the state database (version 2)")?;
        }
        // Later versions: `if current < 3 { ... }` here.
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .ctx("recording the schema version")?;
        tx.commit().ctx("committing the schema migration")?;
        Ok(())
    }

    fn user_version(&self) -> Result<i64, StateError> {
        self.conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .ctx("reading the schema version")
    }

    fn newer_schema(&self, found: i64) -> StateError {
        StateError::NewerSchema {
            path: self.path.clone(),
            found,
            supported: SCHEMA_VERSION,
        }
    }

    /// Starts a write transaction that holds the write lock from its first statement, so what
    /// it reads cannot change before it writes. Rolled back on drop unless committed.
    fn immediate(&self, context: &str) -> Result<Transaction<'_>, StateError> {
        Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).ctx(context)
    }

    /// Records a new VM with status [`VmStatus::Created`]: allocates a fresh ID whose short
    /// form is unique (and not all digits, which would read as a number in host names), checks
    /// the name (or generates a free `adjective_noun` one), and stamps `created_at`. Of several
    /// processes creating the same name at once, exactly one succeeds; the others get
    /// [`StateError::NameInUse`].
    pub fn create(&self, new: &NewVm) -> Result<VmRecord, StateError> {
        if let Some(name) = &new.name {
            validate_name(name)?;
        }
        let spec = new.spec.to_string();
        let tx = self.immediate("creating a VM record")?;
        let name = match &new.name {
            Some(name) => {
                if let Some(id) = id_by_name(&tx, name)? {
                    return Err(StateError::NameInUse {
                        name: name.clone(),
                        id,
                    });
                }
                name.clone()
            }
            None => generate_name(&tx)?,
        };
        let id = allocate_id(&tx)?;
        let record = VmRecord {
            id,
            name,
            image: new.image.clone(),
            image_digest: new.image_digest.clone(),
            kernel: new.kernel.clone(),
            backend: new.backend.clone(),
            spec: new.spec.clone(),
            dir: new.dir.clone(),
            status: VmStatus::Created,
            exit_code: None,
            status_reason: None,
            supervisor_pid: None,
            vmm_pid: None,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
        };
        let inserted = tx.execute(
            &format!(
                "INSERT INTO vms (short_id, {COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
            ),
            params![
                short(&record.id),
                record.id,
                record.name,
                record.image,
                record.image_digest,
                record.kernel,
                record.backend,
                spec,
                PathSql(&record.dir),
                record.status,
                record.exit_code,
                record.status_reason,
                record.supervisor_pid,
                record.vmm_pid,
                record.created_at,
                record.started_at,
                record.finished_at,
            ],
        );
        if let Err(e) = inserted {
            return Err(name_conflict(&tx, &record.name, e, "recording the new VM"));
        }
        tx.commit().ctx("committing the new VM record")?;
        Ok(record)
    }

    /// Finds one VM the way `docker` does: by full ID, then by exact name, then by a unique ID
    /// prefix (one character or more). A name therefore wins over an ID prefix that happens to
    /// spell it. [`StateError::NotFound`] if nothing matches, [`StateError::Ambiguous`] if a
    /// prefix matches several VMs.
    pub fn get(&self, id_or_name: &str) -> Result<VmRecord, StateError> {
        // One read transaction, so the three lookups see the same snapshot.
        let tx = self
            .conn
            .unchecked_transaction()
            .ctx("reading the state database")?;
        let record = resolve(&tx, id_or_name)?;
        tx.commit().ctx("ending a read of the state database")?;
        Ok(record)
    }

    /// All VMs (`all`, like `kiln ps -a`) or only those with a supervisor, i.e. starting,
    /// running or stopping (like `kiln ps`), newest first.
    pub fn list(&self, all: bool) -> Result<Vec<VmRecord>, StateError> {
        let filter = if all {
            ""
        } else {
            "WHERE status IN ('starting', 'running', 'stopping')"
        };
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM vms {filter} ORDER BY seq DESC"
            ))
            .ctx("listing VMs")?;
        let raws = statement
            .query_map([], read_row)
            .ctx("listing VMs")?
            .collect::<rusqlite::Result<Vec<RawVm>>>()
            .ctx("listing VMs")?;
        raws.into_iter().map(RawVm::into_record).collect()
    }

    /// Reads the VM named by `id` (anything [`get`](Self::get) accepts), lets `f` change it,
    /// and writes it back, all in one IMMEDIATE transaction: no other process can change the
    /// record in between, so concurrent updates never lose each other's changes. Returns the
    /// record as written.
    ///
    /// `f` may change any field except `id` and `created_at` ([`StateError::Immutable`]); a new
    /// name is validated and checked for uniqueness like in [`create`](Self::create). `f` must
    /// be quick and must not use this store (the transaction is open while it runs). Nothing
    /// is written if `f` panics or an error is returned.
    pub fn update<F: FnOnce(&mut VmRecord)>(&self, id: &str, f: F) -> Result<VmRecord, StateError> {
        let tx = self.immediate("updating a VM record")?;
        let before = resolve(&tx, id)?;
        let mut record = before.clone();
        f(&mut record);
        if record.id != before.id {
            return Err(StateError::Immutable {
                field: "id",
                id: before.id,
            });
        }
        if record.created_at != before.created_at {
            return Err(StateError::Immutable {
                field: "created_at",
                id: before.id,
            });
        }
        if record.name != before.name {
            validate_name(&record.name)?;
            if let Some(holder) = id_by_name(&tx, &record.name)? {
                return Err(StateError::NameInUse {
                    name: record.name,
                    id: holder,
                });
            }
        }
        let updated = tx.execute(
            "UPDATE vms SET name = ?2, image = ?3, image_digest = ?4, kernel = ?5, backend = ?6,
                 spec = ?7, dir = ?8, status = ?9, exit_code = ?10, status_reason = ?11,
                 supervisor_pid = ?12, vmm_pid = ?13, started_at = ?14, finished_at = ?15
             WHERE id = ?1",
            params![
                record.id,
                record.name,
                record.image,
                record.image_digest,
                record.kernel,
                record.backend,
                record.spec.to_string(),
                PathSql(&record.dir),
                record.status,
                record.exit_code,
                record.status_reason,
                record.supervisor_pid,
                record.vmm_pid,
                record.started_at,
                record.finished_at,
            ],
        );
        if let Err(e) = updated {
            return Err(name_conflict(&tx, &record.name, e, "updating a VM record"));
        }
        tx.commit().ctx("committing a VM record update")?;
        Ok(record)
    }

    /// Sets a VM's status and stamps the times that go with it (see [`VmRecord::transition`]),
    /// atomically. Use [`update`](Self::update) with [`VmRecord::transition`] to record an
    /// exit code or reason in the same transaction.
    pub fn set_status(&self, id: &str, status: VmStatus) -> Result<(), StateError> {
        let now = now_ms();
        self.update(id, |record| record.transition(status, now))?;
        Ok(())
    }

    /// Deletes the record of the VM named by `id` (anything [`get`](Self::get) accepts).
    /// Whether a running VM may be removed, and cleaning up its directory, are the caller's
    /// business: the store only forgets it.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let tx = self.immediate("removing a VM record")?;
        let record = resolve(&tx, id)?;
        tx.execute("DELETE FROM vms WHERE id = ?1", [&record.id])
            .ctx("removing a VM record")?;
        tx.commit().ctx("committing the removal of a VM record")?;
        Ok(())
    }

    /// Leases a network address to VM `id`: its existing lease, or `pick(taken)` where `taken`
    /// is every address leased to any VM. Runs in one IMMEDIATE transaction, so concurrent
    /// callers never get the same address. `Ok(None)`: `pick` found no free address.
    pub fn lease_address(
        &self,
        id: &str,
        pick: impl FnOnce(&std::collections::HashSet<String>) -> Option<String>,
    ) -> Result<Option<String>, StateError> {
        let tx = self.immediate("leasing a network address")?;
        let record = resolve(&tx, id)?;
        let taken: std::collections::HashSet<String> = {
            let mut statement = tx
                .prepare("SELECT address, vm_id FROM leases")
                .ctx("reading the address leases")?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .ctx("reading the address leases")?;
            let mut taken = std::collections::HashSet::new();
            for row in rows {
                let (address, vm_id) = row.ctx("reading the address leases")?;
                if vm_id == record.id {
                    return Ok(Some(address));
                }
                taken.insert(address);
            }
            taken
        };
        let Some(address) = pick(&taken) else {
            return Ok(None);
        };
        tx.execute(
            "INSERT INTO leases (address, vm_id) VALUES (?1, ?2)",
            params![address, record.id],
        )
        .ctx("recording an address lease")?;
        tx.commit().ctx("committing an address lease")?;
        Ok(Some(address))
    }

    /// The address leased to VM `id` (full ID), if any.
    pub fn leased_address(&self, id: &str) -> Result<Option<String>, StateError> {
        self.conn
            .query_row("SELECT address FROM leases WHERE vm_id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
            .ctx("reading an address lease")
    }

    /// Releases VM `id`'s (full ID) address lease, if it has one. Removing the VM's record
    /// releases it too.
    pub fn release_address(&self, id: &str) -> Result<(), StateError> {
        self.conn
            .execute("DELETE FROM leases WHERE vm_id = ?1", [id])
            .ctx("releasing an address lease")?;
        Ok(())
    }
}

/// Turns a failed INSERT/UPDATE into [`StateError::NameInUse`] when it broke the name's UNIQUE
/// constraint (a backstop: the pre-check in the same transaction normally catches it first).
fn name_conflict(
    conn: &Connection,
    name: &str,
    error: rusqlite::Error,
    context: &str,
) -> StateError {
    let is_name_conflict = matches!(
        &error,
        rusqlite::Error::SqliteFailure(e, Some(message))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                && message.contains("vms.name")
    );
    if is_name_conflict {
        if let Ok(Some(id)) = id_by_name(conn, name) {
            return StateError::NameInUse {
                name: name.to_string(),
                id,
            };
        }
    }
    sqlite_error(context, error)
}

/// The ID of the VM with this exact name, if any.
fn id_by_name(conn: &Connection, name: &str) -> Result<Option<String>, StateError> {
    conn.prepare_cached("SELECT id FROM vms WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], |row| row.get(0)).optional())
        .ctx("looking up a VM name")
}

/// Finds one record by full ID, exact name, or unique ID prefix, in that order.
fn resolve(conn: &Connection, key: &str) -> Result<VmRecord, StateError> {
    let not_found = || StateError::NotFound(key.to_string());
    if key.is_empty() {
        return Err(not_found());
    }
    let by = |column: &str| -> Result<Option<VmRecord>, StateError> {
        let raw = conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM vms WHERE {column} = ?1"))
            .and_then(|mut s| s.query_row([key], read_row).optional())
            .ctx("looking up a VM")?;
        raw.map(RawVm::into_record).transpose()
    };
    if key.len() == 64 {
        if let Some(record) = by("id")? {
            return Ok(record);
        }
    }
    if let Some(record) = by("name")? {
        return Ok(record);
    }
    if key.len() > 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    // The key is hex only, so it carries no GLOB wildcards.
    let pattern = format!("{}*", key.to_ascii_lowercase());
    let mut statement = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM vms WHERE id GLOB ?1 ORDER BY seq DESC"
        ))
        .ctx("looking up a VM by ID prefix")?;
    let mut matches = statement
        .query_map([&pattern], read_row)
        .ctx("looking up a VM by ID prefix")?
        .collect::<rusqlite::Result<Vec<RawVm>>>()
        .ctx("looking up a VM by ID prefix")?;
    match matches.len() {
        0 => Err(not_found()),
        1 => matches.remove(0).into_record(),
        _ => Err(StateError::Ambiguous {
            prefix: key.to_string(),
            matches: matches
                .iter()
                .map(|raw| short(&raw.id).to_string())
                .collect(),
        }),
    }
}

/// A path as SQL: TEXT when it is UTF-8, else a BLOB of its exact bytes.
struct PathSql<'a>(&'a Path);

impl ToSql for PathSql<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        let bytes = self.0.as_os_str().as_bytes();
        Ok(ToSqlOutput::Borrowed(
            if std::str::from_utf8(bytes).is_ok() {
                ValueRef::Text(bytes)
            } else {
                ValueRef::Blob(bytes)
            },
        ))
    }
}

/// A row as SQLite returns it, before the checks that turn it into a [`VmRecord`].
struct RawVm {
    id: String,
    name: String,
    image: String,
    image_digest: String,
    kernel: String,
    backend: String,
    spec: String,
    dir: Vec<u8>,
    status: String,
    exit_code: Option<i32>,
    status_reason: Option<String>,
    supervisor_pid: Option<i64>,
    vmm_pid: Option<i64>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

/// Reads the [`COLUMNS`] of one row.
fn read_row(row: &Row<'_>) -> rusqlite::Result<RawVm> {
    let dir = match row.get_ref(7)? {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => bytes.to_vec(),
        _ => Vec::new(),
    };
    Ok(RawVm {
        id: row.get(0)?,
        name: row.get(1)?,
        image: row.get(2)?,
        image_digest: row.get(3)?,
        kernel: row.get(4)?,
        backend: row.get(5)?,
        spec: row.get(6)?,
        dir,
        status: row.get(8)?,
        exit_code: row.get(9)?,
        status_reason: row.get(10)?,
        supervisor_pid: row.get(11)?,
        vmm_pid: row.get(12)?,
        created_at: row.get(13)?,
        started_at: row.get(14)?,
        finished_at: row.get(15)?,
    })
}

impl RawVm {
    fn into_record(self) -> Result<VmRecord, StateError> {
        let id = self.id;
        let corrupt = |reason: String| StateError::Corrupt {
            id: id.clone(),
            reason,
        };
        let spec = serde_json::from_str(&self.spec)
            .map_err(|e| corrupt(format!("its spec is not valid JSON: {e}")))?;
        let status = self
            .status
            .parse()
            .map_err(|e: ParseVmStatusError| corrupt(e.to_string()))?;
        let pid = |what: &str, value: Option<i64>| {
            value
                .map(|v| {
                    u32::try_from(v).map_err(|_| corrupt(format!("its {what} {v} is not a PID")))
                })
                .transpose()
        };
        let time = |what: &str, value: i64| {
            u64::try_from(value).map_err(|_| corrupt(format!("its {what} {value} is negative")))
        };
        let supervisor_pid = pid("supervisor_pid", self.supervisor_pid)?;
        let vmm_pid = pid("vmm_pid", self.vmm_pid)?;
        let created_at = time("created_at", self.created_at)?;
        let started_at = self.started_at.map(|t| time("started_at", t)).transpose()?;
        let finished_at = self
            .finished_at
            .map(|t| time("finished_at", t))
            .transpose()?;
        Ok(VmRecord {
            id,
            name: self.name,
            image: self.image,
            image_digest: self.image_digest,
            kernel: self.kernel,
            backend: self.backend,
            spec,
            dir: PathBuf::from(std::ffi::OsStr::from_bytes(&self.dir)),
            status,
            exit_code: self.exit_code,
            status_reason: self.status_reason,
            supervisor_pid,
            vmm_pid,
            created_at,
            started_at,
            finished_at,
        })
    }
}

/// A fresh 64-hex-character ID whose short form no stored VM has.
fn allocate_id(conn: &Connection) -> Result<String, StateError> {
    // A collision of 48 random bits is already unlikely; 100 in a row means a broken RNG.
    for _ in 0..100 {
        let id = new_id()?;
        let short_id = short(&id);
        if short_id.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let taken: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM vms WHERE short_id = ?1)")
            .and_then(|mut s| s.query_row([short_id], |row| row.get(0)))
            .ctx("checking a new VM ID")?;
        if !taken {
            return Ok(id);
        }
    }
    Err(StateError::Exhausted(
        "could not find an unused VM ID after 100 tries; is the random source broken?".to_string(),
    ))
}

/// sha256 of 32 random bytes, the time, the PID and a per-process counter, as lowercase hex:
/// random enough on its own, and distinct across processes and calls even if the random source
/// were to repeat.
fn new_id() -> Result<String, StateError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut random = [0u8; 32];
    fill_random(&mut random)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut hasher = Sha256::new();
    hasher.update(random);
    hasher.update(nanos.to_le_bytes());
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Fills `buf` from the kernel's random source: `getrandom(2)`, or `/dev/urandom` on kernels
/// without it.
fn fill_random(buf: &mut [u8]) -> Result<(), StateError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes that outlives the
        // call; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if let Ok(n) = usize::try_from(n) {
            filled += n;
            continue;
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOSYS) => return read_urandom(&mut buf[filled..]),
            _ => {
                return Err(StateError::Io {
                    context: "reading random bytes for a VM ID from".to_string(),
                    path: PathBuf::from("getrandom(2)"),
                    error,
                })
            }
        }
    }
    Ok(())
}

fn read_urandom(buf: &mut [u8]) -> Result<(), StateError> {
    let path = Path::new("/dev/urandom");
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|error| StateError::Io {
            context: "reading random bytes for a VM ID from".to_string(),
            path: path.to_path_buf(),
            error,
        })
}

/// A random number below `n` (n > 0), for names and retry jitter. Falls back to the clock if
/// the random source fails: these uses only need variety, not secrecy.
fn random_below(n: u64) -> u64 {
    let mut bytes = [0u8; 8];
    let value = match fill_random(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or(0),
    };
    value % n.max(1)
}

/// Adjectives for generated names (Docker-style `adjective_noun`).
const ADJECTIVES: [&str; 50] = [
    "admiring", "agile", "amber", "bold", "brave", "bright", "calm", "clever", "cosmic", "crisp",
    "curious", "daring", "eager", "elegant", "epic", "fervent", "fluffy", "focused", "gentle",
    "glad", "golden", "happy", "hardy", "humble", "jolly", "keen", "kind", "lively", "lucid",
    "mellow", "merry", "modest", "nimble", "noble", "peaceful", "plucky", "polite", "proud",
    "quick", "quiet", "rapid", "serene", "sharp", "shiny", "silent", "snappy", "steady", "sunny",
    "swift", "witty",
];

/// Nouns (animals) for generated names.
const NOUNS: [&str; 50] = [
    "albatross",
    "badger",
    "beaver",
    "bison",
    "cheetah",
    "condor",
    "cougar",
    "coyote",
    "crane",
    "dolphin",
    "eagle",
    "falcon",
    "ferret",
    "finch",
    "gazelle",
    "gecko",
    "heron",
    "ibex",
    "jackal",
    "jaguar",
    "kestrel",
    "koala",
    "lemur",
    "leopard",
    "lynx",
    "marmot",
    "marten",
    "mink",
    "narwhal",
    "ocelot",
    "orca",
    "osprey",
    "otter",
    "owl",
    "panda",
    "pelican",
    "puffin",
    "quokka",
    "raven",
    "robin",
    "salmon",
    "seal",
    "sparrow",
    "stork",
    "swan",
    "tapir",
    "tiger",
    "toucan",
    "walrus",
    "wombat",
];

/// A random `adjective_noun` name no VM has; once many plain ones are taken, a number is
/// appended (`adjective_noun_1234`), as Docker does on retries.
fn generate_name(conn: &Connection) -> Result<String, StateError> {
    for attempt in 0..200 {
        let adjective = ADJECTIVES[random_below(ADJECTIVES.len() as u64) as usize];
        let noun = NOUNS[random_below(NOUNS.len() as u64) as usize];
        let name = if attempt < 20 {
            format!("{adjective}_{noun}")
        } else {
            format!("{adjective}_{noun}_{}", random_below(10_000))
        };
        if id_by_name(conn, &name)?.is_none() {
            return Ok(name);
        }
    }
    Err(StateError::Exhausted(
        "could not generate an unused VM name after 200 tries; give one with --name".to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1 database (with a VM in it) is migrated in place to version 2, and its VMs
    /// can lease addresses.
    #[test]
    fn version_1_databases_gain_leases() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(root.path()).expect("open");
        let record = store
            .create(&NewVm {
                name: Some("old".into()),
                image: "i".into(),
                image_digest: "d".into(),
                kernel: "k".into(),
                backend: "qemu".into(),
                spec: serde_json::Value::Null,
                dir: PathBuf::new(),
            })
            .expect("create");
        store
            .conn
            .execute_batch("DROP TABLE leases; PRAGMA user_version = 1;")
            .expect("make it version 1");
        drop(store);
        let store = StateStore::open(root.path()).expect("reopen");
        assert_eq!(store.user_version().expect("version"), SCHEMA_VERSION);
        let address = store
            .lease_address("old", |_| Some("10.88.0.2".into()))
            .expect("lease");
        assert_eq!(address.as_deref(), Some("10.88.0.2"));
        assert_eq!(
            store.leased_address(&record.id).expect("get").as_deref(),
            Some("10.88.0.2")
        );
    }
}
