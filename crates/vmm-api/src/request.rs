//! Turns an HTTP method, path and body into a [`VmmAction`], or says why it cannot.
//!
//! This is kept free of sockets and async so that every routing and parsing rule can be unit
//! tested directly; the server only adds I/O around [`parse`].
//!
//! Only the request's form is checked here: route, JSON shape and ids. Whether the values are
//! acceptable (vCPU counts, files that open, the VM's state) is the VMM's call, made with the
//! `validate()` methods of [`vmm::config`] after its state checks, so that a client hears
//! "not allowed after InstanceStart" before any complaint about a value, as with Firecracker.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use vmm::config::{
    validate_id, BootSourceConfig, ConfigError, DriveConfig, DriveUpdate, EntropyConfig,
    LoggerConfig, MachineConfig, MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig,
    NetworkInterfaceUpdate, VsockConfig,
};
use vmm::rpc::VmmAction;

/// What a well-formed request asks for.
#[derive(Debug, PartialEq)]
pub(crate) enum Parsed {
    /// Something only the VMM's event loop can answer.
    Vmm(VmmAction),
    /// `GET /version`, answered by the server itself so that it works even while the VMM is busy.
    Version,
}

/// The HTTP methods the API knows; anything else is an invalid method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    /// Read a resource.
    Get,
    /// Create or replace a resource.
    Put,
    /// Change part of a resource.
    Patch,
}

/// Why a request was refused before reaching the VMM; `Display` is the `fault_message`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// Firecracker clients recognise this exact wording for an unknown route.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod {
        /// The method as sent.
        method: String,
        /// The path as sent.
        path: String,
    },
    /// A PUT or PATCH came without the JSON body it needs.
    #[error("Empty {method} request: {path} needs a JSON body.")]
    EmptyBody {
        /// "PUT" or "PATCH".
        method: &'static str,
        /// The path as sent.
        path: String,
    },
    /// GETs take no input; a body is most likely a client bug.
    #[error("A GET request cannot have a body.")]
    GetWithBody,
    /// The body is not the JSON this route takes (syntax, unknown field, wrong type...).
    #[error("The request body could not be parsed as {what}: {field}{source}.")]
    Json {
        /// The kind of object expected, for the message.
        what: &'static str,
        /// "field `name`: " when the problem is inside a field, else empty.
        field: String,
        /// serde's description of the problem, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The body is JSON, or starts like it, but is not an object.
    #[error("The request body could not be parsed as {what}: expected a JSON object.")]
    NotAnObject {
        /// The kind of object expected, for the message.
        what: &'static str,
    },
    /// `PUT|PATCH /drives/{id}` (or `/network-interfaces/{id}`) with a different id in the body.
    #[error(
        "The {kind} ID in the path ({path_id}) does not match the {field} in the body ({body_id})."
    )]
    DriveIdMismatch {
        /// What the id names.
        kind: &'static str,
        /// The body's id field.
        field: &'static str,
        /// The id from the path.
        path_id: String,
        /// The id from the body.
        body_id: String,
    },
    /// A PATCH that changes nothing is refused as in Firecracker.
    #[error("Empty PATCH request: {path} needs at least one field to change.")]
    EmptyPatch {
        /// The path as sent.
        path: String,
    },
    /// An id in the path is empty or has characters outside `[A-Za-z0-9_-]`.
    #[error(transparent)]
    InvalidId(#[from] ConfigError),
}

/// Body of `PUT /actions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

/// The synchronous actions Firecracker defines and kiln-vmm implements.
#[derive(Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// Body of `PATCH /vm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmState,
}

/// The states a client may ask the VM to move to.
#[derive(Deserialize)]
enum VmState {
    Paused,
    Resumed,
}

/// Parses a JSON body into `T`, naming `what` in the error.
///
/// Every body is a JSON object. serde would also take a struct from an array of its fields in
/// order (`[1, 128]` as a machine configuration), which no client means to send, so anything
/// but an object is refused first.
fn json<T: DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, RequestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return Err(RequestError::NotAnObject { what });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." {
            String::new()
        } else {
            format!("field `{path}`: ")
        };
        RequestError::Json {
            what,
            field,
            source: e.into_inner(),
        }
    })?;
    deserializer.end().map_err(|source| RequestError::Json {
        what,
        field: String::new(),
        source,
    })?;
    Ok(value)
}

/// Routes one request. `path` is the URI path without the query; `body` is empty when the
/// request had none.
pub(crate) fn parse(method: &str, path: &str, body: &[u8]) -> Result<Parsed, RequestError> {
    let invalid = || RequestError::InvalidPathMethod {
        method: method.to_string(),
        path: path.to_string(),
    };
    let method = match method {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "PATCH" => Method::Patch,
        _ => return Err(invalid()),
    };
    // Like Firecracker, tolerate repeated and trailing slashes: clients build paths by joining.
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();

    // Resolve the route first so that an unknown path is reported as such, whatever the body.
    let route = match (method, segments.as_slice()) {
        (Method::Get, []) => Route::InstanceInfo,
        (Method::Get, ["version"]) => Route::Version,
        (Method::Get, ["vm", "config"]) => Route::VmConfig,
        (Method::Get, ["machine-config"]) => Route::GetMachineConfig,
        (Method::Put, ["machine-config"]) => Route::PutMachineConfig,
        (Method::Patch, ["machine-config"]) => Route::PatchMachineConfig,
        (Method::Put, ["boot-source"]) => Route::BootSource,
        (Method::Put, ["drives", id]) => Route::PutDrive(id),
        (Method::Patch, ["drives", id]) => Route::PatchDrive(id),
        // Firecracker answers a missing drive id as an empty id rather than an unknown path.
        (Method::Put | Method::Patch, ["drives"]) => Route::PutDrive(""),
        (Method::Put, ["actions"]) => Route::Actions,
        (Method::Patch, ["vm"]) => Route::Vm,
        (Method::Put, ["logger"]) => Route::Logger,
        (Method::Put, ["metrics"]) => Route::Metrics,
        (Method::Put, ["vsock"]) => Route::Vsock,
        (Method::Put, ["entropy"]) => Route::Entropy,
        (Method::Get, ["mmds"]) => Route::GetMmds,
        (Method::Put, ["mmds"]) => Route::PutMmds,
        (Method::Patch, ["mmds"]) => Route::PatchMmds,
        (Method::Put, ["mmds", "config"]) => Route::MmdsConfig,
        (Method::Put, ["network-interfaces", id]) => Route::PutNetworkInterface(id),
        (Method::Patch, ["network-interfaces", id]) => Route::PatchNetworkInterface(id),
        _ => return Err(invalid()),
    };

    match method {
        Method::Get if !body.is_empty() => return Err(RequestError::GetWithBody),
        Method::Put | Method::Patch if body.iter().all(u8::is_ascii_whitespace) => {
            // A missing drive id is the more useful thing to report.
            if let Route::PutDrive("") = route {
                return Err(validate_id("drive", "").map_or_else(Into::into, |()| invalid()));
            }
            return Err(RequestError::EmptyBody {
                method: if method == Method::Put {
                    "PUT"
                } else {
                    "PATCH"
                },
                path: path.to_string(),
            });
        }
        _ => {}
    }

    let action = match route {
        Route::Version => return Ok(Parsed::Version),
        Route::InstanceInfo => VmmAction::GetInstanceInfo,
        Route::VmConfig => VmmAction::GetVmConfig,
        Route::GetMachineConfig => VmmAction::GetMachineConfig,
        Route::PutMachineConfig => {
            VmmAction::PutMachineConfig(json::<MachineConfig>("a machine configuration", body)?)
        }
        Route::PatchMachineConfig => {
            let update: MachineConfigUpdate = json("a machine configuration update", body)?;
            if update == MachineConfigUpdate::default() {
                return Err(RequestError::EmptyPatch {
                    path: path.to_string(),
                });
            }
            VmmAction::PatchMachineConfig(update)
        }
        Route::BootSource => {
            VmmAction::PutBootSource(json::<BootSourceConfig>("a boot source", body)?)
        }
        Route::PutDrive(path_id) => {
            validate_id("drive", path_id)?;
            let config: DriveConfig = json("a drive", body)?;
            check_same_id("drive_id", path_id, &config.drive_id)?;
            VmmAction::PutDrive(config)
        }
        Route::PatchDrive(path_id) => {
            validate_id("drive", path_id)?;
            let update: DriveUpdate = json("a drive update", body)?;
            check_same_id("drive_id", path_id, &update.drive_id)?;
            VmmAction::PatchDrive(update)
        }
        Route::Actions => match json::<ActionBody>("an action", body)?.action_type {
            ActionType::InstanceStart => VmmAction::InstanceStart,
            ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        },
        Route::Vm => match json::<VmStateBody>("a VM state", body)?.state {
            VmState::Paused => VmmAction::Pause,
            VmState::Resumed => VmmAction::Resume,
        },
        Route::Logger => VmmAction::PutLogger(logger_config(body)?),
        Route::Metrics => {
            VmmAction::PutMetrics(json::<MetricsConfig>("a metrics configuration", body)?)
        }
        Route::Vsock => VmmAction::PutVsock(json::<VsockConfig>("a vsock configuration", body)?),
        Route::Entropy => VmmAction::PutEntropy(json::<EntropyConfig>(
            "an entropy device configuration",
            body,
        )?),
        Route::GetMmds => VmmAction::GetMmds,
        Route::PutMmds => VmmAction::PutMmds(json("the metadata document", body)?),
        Route::PatchMmds => VmmAction::PatchMmds(json("a metadata patch", body)?),
        Route::MmdsConfig => {
            VmmAction::PutMmdsConfig(json::<mmds::MmdsConfig>("an MMDS configuration", body)?)
        }
        Route::PutNetworkInterface(path_id) => {
            validate_id("network interface", path_id)?;
            let config: NetworkInterfaceConfig = json("a network interface", body)?;
            check_same_id("iface_id", path_id, &config.iface_id)?;
            VmmAction::PutNetworkInterface(config)
        }
        Route::PatchNetworkInterface(path_id) => {
            validate_id("network interface", path_id)?;
            let update: NetworkInterfaceUpdate = json("a network interface update", body)?;
            check_same_id("iface_id", path_id, &update.iface_id)?;
            VmmAction::PatchNetworkInterface(update)
        }
    };
    Ok(Parsed::Vmm(action))
}

/// Parses a `PUT /logger` body. Firecracker documents `level` as case-insensitive ("info" and
/// "INFO" both work), so the level is put in canonical case before the typed parse.
fn logger_config(body: &[u8]) -> Result<LoggerConfig, RequestError> {
    const WHAT: &str = "a logger configuration";
    let mut value: serde_json::Value = json(WHAT, body)?;
    if let Some(level) = value.get_mut("level") {
        if let Some(name) = level.as_str() {
            let canonical = ["Off", "Error", "Warning", "Info", "Debug", "Trace"]
                .into_iter()
                .find(|known| known.eq_ignore_ascii_case(name));
            if let Some(canonical) = canonical {
                *level = serde_json::Value::from(canonical);
            }
        }
    }
    serde_json::from_value(value).map_err(|source| RequestError::Json {
        what: WHAT,
        field: String::new(),
        source,
    })
}

/// The routes, resolved before the body is looked at.
#[derive(Clone, Copy)]
enum Route<'a> {
    InstanceInfo,
    Version,
    VmConfig,
    GetMachineConfig,
    PutMachineConfig,
    PatchMachineConfig,
    BootSource,
    PutDrive(&'a str),
    PatchDrive(&'a str),
    Actions,
    Vm,
    Logger,
    Metrics,
    Vsock,
    Entropy,
    PutNetworkInterface(&'a str),
    PatchNetworkInterface(&'a str),
    GetMmds,
    PutMmds,
    PatchMmds,
    MmdsConfig,
}

/// The path and body must name the same drive, so that a client cannot configure one drive
/// while believing it configures another.
fn check_same_id(field: &'static str, path_id: &str, body_id: &str) -> Result<(), RequestError> {
    let kind = if field == "drive_id" {
        "drive"
    } else {
        "network interface"
    };
    if path_id == body_id {
        Ok(())
    } else {
        Err(RequestError::DriveIdMismatch {
            kind,
            field,
            path_id: path_id.to_string(),
            body_id: body_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn ok(method: &str, path: &str, body: &str) -> Parsed {
        match parse(method, path, body.as_bytes()) {
            Ok(parsed) => parsed,
            Err(err) => panic!("{method} {path} {body}: {err}"),
        }
    }

    fn err(method: &str, path: &str, body: &str) -> String {
        match parse(method, path, body.as_bytes()) {
            Ok(parsed) => panic!("{method} {path} {body} was accepted as {parsed:?}"),
            Err(err) => err.to_string(),
        }
    }

    /// A file that exists for the life of the test, for boot-source and drive bodies.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("kiln-api-request-{}-{name}", std::process::id()));
            std::fs::write(&path, [0u8; 512]).expect("write temp file");
            TempFile(path)
        }

        fn path(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn gets_route_to_their_actions() {
        assert_eq!(ok("GET", "/", ""), Parsed::Vmm(VmmAction::GetInstanceInfo));
        assert_eq!(ok("GET", "/version", ""), Parsed::Version);
        assert_eq!(
            ok("GET", "/vm/config", ""),
            Parsed::Vmm(VmmAction::GetVmConfig)
        );
        assert_eq!(
            ok("GET", "/machine-config", ""),
            Parsed::Vmm(VmmAction::GetMachineConfig)
        );
        assert_eq!(
            ok("GET", "//machine-config/", ""),
            Parsed::Vmm(VmmAction::GetMachineConfig)
        );
    }

    #[test]
    fn machine_config_bodies() {
        let parsed = ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":256}"#,
        );
        let Parsed::Vmm(VmmAction::PutMachineConfig(config)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(
            (config.vcpu_count, config.mem_size_mib, config.smt),
            (2, 256, false)
        );

        let parsed = ok("PATCH", "/machine-config", r#"{"mem_size_mib":64}"#);
        assert_eq!(
            parsed,
            Parsed::Vmm(VmmAction::PatchMachineConfig(MachineConfigUpdate {
                mem_size_mib: Some(64),
                ..Default::default()
            }))
        );

        // Values are the VMM's to judge (after its state checks), not the parser's.
        let parsed = ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":3,"mem_size_mib":0}"#,
        );
        assert!(
            matches!(parsed, Parsed::Vmm(VmmAction::PutMachineConfig(_))),
            "{parsed:?}"
        );
        let message = err("PUT", "/machine-config", r#"{"vcpu_count":1}"#);
        assert!(message.contains("could not be parsed") && message.contains("mem_size_mib"));
        let message = err("PATCH", "/machine-config", "{}");
        assert!(message.starts_with("Empty PATCH request"), "{message}");
    }

    #[test]
    fn malformed_json_is_reported_as_a_parse_error() {
        for body in [
            "{",
            "not json",
            r#"{"vcpu_count":1,"mem_size_mib":128,"bogus":1}"#,
            r#"{"vcpu_count":"one","mem_size_mib":128}"#,
            r#"{"vcpu_count":-1,"mem_size_mib":128}"#,
            r#"{"vcpu_count":300,"mem_size_mib":128}"#,
            r#"{"vcpu_count":1,"mem_size_mib":128} trailing"#,
            "[]",
            "[1, 128]",
            " \n [1, 128, true]",
            "null",
            "1",
            "\"text\"",
            "\u{feff}{}",
        ] {
            let message = err("PUT", "/machine-config", body);
            assert!(
                message.starts_with(
                    "The request body could not be parsed as a machine configuration: "
                ),
                "{body}: {message}"
            );
        }
        let message = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128,"bogus":1}"#,
        );
        assert!(message.contains("unknown field `bogus`"), "{message}");
        let bad_utf8 = parse("PUT", "/actions", b"{\"action_type\":\"\xff\"}");
        assert!(
            matches!(bad_utf8, Err(RequestError::Json { .. })),
            "{bad_utf8:?}"
        );
    }

    #[test]
    fn unknown_paths_and_methods() {
        for (method, path) in [
            ("GET", "/nope"),
            ("POST", "/actions"),
            ("DELETE", "/drives/rootfs"),
            ("HEAD", "/"),
            ("GET", "/actions"),
            ("PUT", "/"),
            ("PATCH", "/boot-source"),
            ("GET", "/drives/rootfs"),
            ("PUT", "/drives/rootfs/extra"),
            ("GET", "/vm"),
            ("PUT", "/vm/config"),
            ("GET", "/version/x"),
            ("get", "/"),
        ] {
            let message = err(method, path, "{}");
            assert_eq!(
                message,
                format!("Invalid request method and/or path: {method} {path}.")
            );
        }
    }

    #[test]
    fn bodies_are_required_where_they_are_used_and_refused_on_gets() {
        assert_eq!(
            err("PUT", "/boot-source", ""),
            "Empty PUT request: /boot-source needs a JSON body."
        );
        assert_eq!(
            err("PATCH", "/vm", " \r\n"),
            "Empty PATCH request: /vm needs a JSON body."
        );
        assert_eq!(
            err("PUT", "/actions", ""),
            "Empty PUT request: /actions needs a JSON body."
        );
        assert_eq!(err("GET", "/", "{}"), "A GET request cannot have a body.");
    }

    #[test]
    fn actions_and_vm_state() {
        let cases = [
            ("InstanceStart", VmmAction::InstanceStart),
            ("SendCtrlAltDel", VmmAction::SendCtrlAltDel),
            ("FlushMetrics", VmmAction::FlushMetrics),
        ];
        for (name, action) in cases {
            let body = format!(r#"{{"action_type":"{name}"}}"#);
            assert_eq!(ok("PUT", "/actions", &body), Parsed::Vmm(action));
        }
        let message = err("PUT", "/actions", r#"{"action_type":"Explode"}"#);
        assert!(message.contains("unknown variant `Explode`"), "{message}");
        let message = err(
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart","extra":1}"#,
        );
        assert!(message.contains("unknown field"), "{message}");
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Paused"}"#),
            Parsed::Vmm(VmmAction::Pause)
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Resumed"}"#),
            Parsed::Vmm(VmmAction::Resume)
        );
        let message = err("PATCH", "/vm", r#"{"state":"Running"}"#);
        assert!(
            message.contains("could not be parsed as a VM state"),
            "{message}"
        );
    }

    #[test]
    fn drives_check_ids_and_files() {
        let disk = TempFile::new("disk");
        let body = format!(
            r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":true,"is_read_only":false}}"#,
            disk.path()
        );
        let parsed = ok("PUT", "/drives/rootfs", &body);
        let Parsed::Vmm(VmmAction::PutDrive(drive)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(drive.drive_id, "rootfs");
        assert!(drive.is_root_device);

        assert_eq!(
            err("PUT", "/drives/other", &body),
            "The drive ID in the path (other) does not match the drive_id in the body (rootfs)."
        );
        let message = err("PUT", "/drives/bad.id", &body);
        assert!(message.contains("\"bad.id\" is invalid"), "{message}");
        let message = err("PUT", "/drives/a%20b", &body);
        assert!(message.contains("invalid"), "{message}");
        assert_eq!(
            err("PUT", "/drives", &body),
            "The drive ID cannot be empty."
        );
        assert_eq!(err("PUT", "/drives/", ""), "The drive ID cannot be empty.");

        let missing =
            r#"{"drive_id":"rootfs","path_on_host":"/nonexistent/disk.img","is_root_device":true}"#;
        let parsed = ok("PUT", "/drives/rootfs", missing);
        assert!(
            matches!(parsed, Parsed::Vmm(VmmAction::PutDrive(_))),
            "{parsed:?}"
        );

        let patch = format!(
            r#"{{"drive_id":"rootfs","path_on_host":"{}"}}"#,
            disk.path()
        );
        let parsed = ok("PATCH", "/drives/rootfs", &patch);
        assert!(
            matches!(parsed, Parsed::Vmm(VmmAction::PatchDrive(_))),
            "{parsed:?}"
        );
        let message = err("PATCH", "/drives/data", &patch);
        assert!(message.contains("does not match"), "{message}");
    }

    #[test]
    fn boot_source_bodies() {
        let kernel = TempFile::new("kernel");
        let body = format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1 pci=off"}}"#,
            kernel.path()
        );
        let parsed = ok("PUT", "/boot-source", &body);
        assert!(
            matches!(parsed, Parsed::Vmm(VmmAction::PutBootSource(_))),
            "{parsed:?}"
        );
        let message = err("PUT", "/boot-source", r#"{"boot_args":"console=ttyS0"}"#);
        assert!(
            message.contains("missing field `kernel_image_path`"),
            "{message}"
        );
    }

    #[test]
    fn logger_and_metrics() {
        let parsed = ok(
            "PUT",
            "/logger",
            r#"{"log_path":"/tmp/log","level":"Info","show_level":true}"#,
        );
        assert!(
            matches!(parsed, Parsed::Vmm(VmmAction::PutLogger(_))),
            "{parsed:?}"
        );
        let parsed = ok("PUT", "/metrics", r#"{"metrics_path":"/tmp/metrics"}"#);
        assert!(
            matches!(parsed, Parsed::Vmm(VmmAction::PutMetrics(_))),
            "{parsed:?}"
        );
        let parsed = ok("PUT", "/logger", r#"{"level":"debug"}"#);
        let Parsed::Vmm(VmmAction::PutLogger(logger)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(logger.level, Some(vmm::config::LogLevel::Debug));
        let message = err("PUT", "/logger", r#"{"level":"loud"}"#);
        assert!(message.contains("unknown variant `loud`"), "{message}");
        let message = err("PUT", "/logger", r#"{"level":"Info","colour":true}"#);
        assert!(message.contains("unknown field `colour`"), "{message}");
        let message = err("PUT", "/metrics", "{}");
        assert!(
            message.contains("missing field `metrics_path`"),
            "{message}"
        );
    }
}
