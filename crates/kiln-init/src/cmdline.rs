//! The kernel command line: how kiln tells the agent where its root disk is and which
//! transport to serve on, in the same words the busybox `/init` script understood.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `root=DEV` | root disk: `/dev/NAME`, `UUID=...` or `LABEL=...` (ext2/3/4) | `/dev/vda` |
//! | `rootfstype=TYPE` | its file system | `ext4` |
//! | `rootflags=OPTS` | extra mount options | none |
//! | `ro` / `rw` | mount read-only / read-write | `rw` |
//! | `kiln.rootwait=SECS` | how long to wait for the root disk and the transport | 30 |
//! | `kiln.transport=vsock\|serial` | the agent's transport | whichever device appears |
//! | `kiln.debug` | progress lines on the console | off |
//! | `MODULE.PARAM=VALUE` | a parameter for a module the agent loads | |

use std::time::Duration;

/// Where the agent serves the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// AF_VSOCK, port [`kiln_agent_protocol::VSOCK_PORT`] (kiln-vmm).
    Vsock,
    /// The virtio-console port named [`kiln_agent_protocol::SERIAL_PORT_NAME`] (QEMU).
    Serial,
}

/// The boot options the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// `root=`.
    pub root: String,
    /// `rootfstype=`.
    pub rootfstype: String,
    /// `rootflags=`.
    pub rootflags: String,
    /// `ro` (the last of `ro`/`rw` wins).
    pub read_only: bool,
    /// `kiln.rootwait=`.
    pub rootwait: Duration,
    /// `kiln.transport=`; `None` picks whichever device shows up.
    pub transport: Option<TransportKind>,
    /// `kiln.debug`.
    pub debug: bool,
    /// Options that were given but not understood, to warn about.
    pub warnings: Vec<String>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            root: "/dev/vda".into(),
            rootfstype: "ext4".into(),
            rootflags: String::new(),
            read_only: false,
            rootwait: Duration::from_secs(30),
            transport: None,
            debug: false,
            warnings: Vec::new(),
        }
    }
}

/// Splits a command line into words as the kernel does: on blanks, except inside double
/// quotes. Quotes are kept, because module parameters are passed on to the kernel verbatim.
pub fn split(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// A value without the double quotes that grouped it.
fn unquote(value: &str) -> String {
    value.replace('"', "")
}

/// Reads the boot options from the command line's words.
pub fn parse(words: &[String]) -> BootOptions {
    let mut o = BootOptions::default();
    for word in words {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(unquote(v))),
            None => (word.as_str(), None),
        };
        match (key, value) {
            ("root", Some(v)) if !v.is_empty() => o.root = v,
            ("rootfstype", Some(v)) if !v.is_empty() => o.rootfstype = v,
            ("rootflags", Some(v)) => o.rootflags = v,
            ("ro", None) => o.read_only = true,
            ("rw", None) => o.read_only = false,
            ("kiln.rootwait", Some(v)) => match v.parse::<u64>() {
                Ok(secs) => o.rootwait = Duration::from_secs(secs),
                Err(_) => o.warnings.push(format!(
                    "ignoring kiln.rootwait={v}: not a number of seconds"
                )),
            },
            ("kiln.transport", Some(v)) => match v.as_str() {
                "vsock" => o.transport = Some(TransportKind::Vsock),
                "serial" => o.transport = Some(TransportKind::Serial),
                _ => o
                    .warnings
                    .push(format!("ignoring kiln.transport={v}: use vsock or serial")),
            },
            ("kiln.debug", None) => o.debug = true,
            ("kiln.debug", Some(v)) => o.debug = !matches!(v.as_str(), "0" | "off" | "no"),
            _ => {}
        }
    }
    o
}

/// The parameters for module `name` (`name.PARAM=VALUE` words, `-` and `_` alike as the kernel
/// treats them), as the space-separated string `finit_module` takes.
pub fn module_params(words: &[String], name: &str) -> String {
    let name = name.replace('-', "_");
    let mut params = Vec::new();
    for word in words {
        if let Some((module, param)) = word.split_once('.') {
            if module.replace('-', "_") == name && param.contains('=') {
                params.push(param);
            }
        }
    }
    params.join(" ")
}

/// The kernel's name for the module in file `path` (`kernel/fs/ext4/ext4.ko` → `ext4`).
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    stem.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        split(s)
    }

    #[test]
    fn defaults_when_nothing_is_given() {
        let o = parse(&words("console=ttyS0 quiet"));
        assert_eq!(o, BootOptions::default());
    }

    #[test]
    fn every_option_is_read() {
        let o = parse(&words(
            "root=/dev/vdb rootfstype=ext2 rootflags=noatime,data=ordered ro \
             kiln.rootwait=5 kiln.transport=serial kiln.debug",
        ));
        assert_eq!(o.root, "/dev/vdb");
        assert_eq!(o.rootfstype, "ext2");
        assert_eq!(o.rootflags, "noatime,data=ordered");
        assert!(o.read_only);
        assert_eq!(o.rootwait, Duration::from_secs(5));
        assert_eq!(o.transport, Some(TransportKind::Serial));
        assert!(o.debug);
        assert!(o.warnings.is_empty());
    }

    #[test]
    fn last_of_ro_and_rw_wins_and_bad_values_warn() {
        let o = parse(&words(
            "ro rw kiln.rootwait=soon kiln.transport=carrier-pigeon",
        ));
        assert!(!o.read_only);
        assert_eq!(o.rootwait, Duration::from_secs(30));
        assert_eq!(o.transport, None);
        assert_eq!(o.warnings.len(), 2);
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(
            words(r#"a  b="c d" e"#),
            vec!["a".to_string(), r#"b="c d""#.to_string(), "e".to_string()]
        );
        assert_eq!(
            parse(&words(r#"root="LABEL=my root""#)).root,
            "LABEL=my root"
        );
    }

    #[test]
    fn module_params_are_collected_per_module() {
        let w =
            words("virtio_blk.queue_depth=64 virtio-net.napi_tx=1 ext4.x=1 virtio_blk.y=\"a b\"");
        assert_eq!(module_params(&w, "virtio_blk"), "queue_depth=64 y=\"a b\"");
        assert_eq!(module_params(&w, "virtio_net"), "napi_tx=1");
        assert_eq!(module_params(&w, "vsock"), "");
    }

    #[test]
    fn module_names_follow_the_kernel() {
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko"), "ext4");
        assert_eq!(
            module_name("kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"),
            "vmw_vsock_virtio_transport"
        );
        assert_eq!(
            module_name("kernel/drivers/block/virtio-blk.ko"),
            "virtio_blk"
        );
    }
}
