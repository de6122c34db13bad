//! Resolving `ProcessSpec::user` against the guest's `/etc/passwd` and `/etc/group`.
//!
//! The agent is a static glibc binary, where `getpwnam` and friends would need NSS modules
//! the image may not have (or may have in another libc version), so the files are parsed here,
//! with the rules runc applies for Docker: `name`, `uid`, `name:group` or `uid:gid`; a numeric
//! uid that passwd does not know is allowed (gid 0, home `/`); an unknown name is an error.

use std::path::Path;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary groups: every `/etc/group` entry that lists the user's name.
    pub groups: Vec<u32>,
    /// The home directory (the `HOME` default); `/` when passwd has none.
    pub home: String,
}

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// One `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                home: f.get(5).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `spec` (`None` or empty: root) from the texts of passwd and group.
pub fn resolve_in(spec: Option<&str>, passwd: &str, group: &str) -> Result<User, String> {
    let spec = spec.unwrap_or("").trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let users = parse_passwd(passwd);
    let groups = parse_group(group);

    let (uid, mut gid, home, name) = match user_part.parse::<u32>() {
        Ok(uid) => match users.iter().find(|u| u.uid == uid) {
            Some(e) => (e.uid, e.gid, e.home.clone(), Some(e.name.as_str())),
            None => (uid, 0, String::from("/"), None),
        },
        Err(_) => {
            let e = users.iter().find(|u| u.name == user_part).ok_or_else(|| {
                format!("unable to find user {user_part}: no matching entries in passwd file")
            })?;
            (e.uid, e.gid, e.home.clone(), Some(e.name.as_str()))
        }
    };
    match group_part {
        None | Some("") => {}
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => groups
                    .iter()
                    .find(|e| e.name == g)
                    .map(|e| e.gid)
                    .ok_or_else(|| {
                        format!("unable to find group {g}: no matching entries in group file")
                    })?,
            }
        }
    }
    let mut supplementary = Vec::new();
    if let Some(name) = name {
        for g in &groups {
            if g.members.iter().any(|m| m == name) && !supplementary.contains(&g.gid) {
                supplementary.push(g.gid);
            }
        }
    }
    let home = if home.is_empty() { "/".into() } else { home };
    Ok(User {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

/// Resolves `spec` against `root/etc/passwd` and `root/etc/group` (missing files are empty, as
/// in a scratch image).
pub fn resolve(spec: Option<&str>, root: &Path) -> Result<User, String> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    resolve_in(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # a comment\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        app:x:1000:1000::/home/app:/bin/sh\n\
        broken:x:notanumber:1::/:\n\
        nohome:x:1001:1001::\n";
    const GROUP: &str = "root:x:0:\n\
        daemon:x:1:\n\
        wheel:x:10:app,daemon\n\
        audio:x:29:app\n\
        nogroup:x:65534:\n\
        app:x:1000:\n";

    fn r(spec: Option<&str>) -> Result<User, String> {
        resolve_in(spec, PASSWD, GROUP)
    }

    #[test]
    fn no_user_is_root() {
        let u = r(None).expect("root");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
        assert!(u.groups.is_empty());
        assert_eq!(r(Some("")).expect("root").uid, 0);
    }

    #[test]
    fn names_resolve_with_their_groups() {
        let u = r(Some("app")).expect("app");
        assert_eq!(
            u,
            User {
                uid: 1000,
                gid: 1000,
                groups: vec![10, 29],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn numeric_uids_use_passwd_when_they_can() {
        let u = r(Some("65534")).expect("nobody");
        assert_eq!(
            (u.uid, u.gid, u.home.as_str()),
            (65534, 65534, "/nonexistent")
        );
        let u = r(Some("4242")).expect("unknown uid");
        assert_eq!(
            u,
            User {
                uid: 4242,
                gid: 0,
                groups: vec![],
                home: "/".into()
            }
        );
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(r(Some("app:wheel")).expect("app:wheel").gid, 10);
        assert_eq!(r(Some("1000:77")).expect("1000:77").gid, 77);
        assert_eq!(r(Some("4242:4343")).expect("4242:4343").gid, 4343);
        assert_eq!(r(Some("app:")).expect("app:").gid, 1000);
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            r(Some("ghost")).expect_err("ghost"),
            "unable to find user ghost: no matching entries in passwd file"
        );
        assert_eq!(
            r(Some("app:ghosts")).expect_err("ghosts"),
            "unable to find group ghosts: no matching entries in group file"
        );
    }

    #[test]
    fn missing_home_is_root_dir_and_bad_lines_are_skipped() {
        assert_eq!(r(Some("nohome")).expect("nohome").home, "/");
        assert!(r(Some("broken")).is_err());
    }

    #[test]
    fn an_image_without_passwd_still_runs_numeric_users() {
        let u = resolve_in(Some("1:2"), "", "").expect("numeric");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1, 2, "/"));
        assert_eq!(resolve_in(None, "", "").expect("root").home, "/");
    }
}
