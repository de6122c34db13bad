//! The metadata document the host writes (API `PUT`/`PATCH /mmds`) and the guest reads.

use serde_json::{Map, Value};

/// Firecracker's default for `--mmds-size-limit`: the largest serialized document, in bytes.
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

/// Why the host's metadata was refused; the `Display` text is meant for an API `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The document would grow past the configured limit (Firecracker's API answers 413).
    #[error(
        "The MMDS data store is limited to {limit} bytes; the new contents take {size} bytes."
    )]
    TooLarge {
        /// Serialized size of the refused document.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Guests address the store by path, so its root must be a JSON object.
    #[error("The MMDS contents must be a JSON object.")]
    NotAnObject,
    /// A merge patch needs a document to apply to; Firecracker refuses `PATCH` before any `PUT`.
    #[error("The MMDS data store is not initialized: PUT the contents before patching them.")]
    NotInitialized,
}

impl StoreError {
    /// The API status Firecracker answers with: 413 when the limit is exceeded, else 400.
    pub fn status_code(&self) -> u16 {
        match self {
            StoreError::TooLarge { .. } => 413,
            StoreError::NotAnObject | StoreError::NotInitialized => 400,
        }
    }
}

/// Why a guest-side lookup produced no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LookupError {
    /// No value at that path (404).
    NotFound,
    /// The value exists but the IMDS text format cannot express it (501).
    UnsupportedType,
}

/// How a guest asked to see a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Compact JSON (`Accept: application/json`).
    Json,
    /// EC2 IMDS text: key listings and bare strings.
    Imds,
}

/// The JSON document with its size limit.
#[derive(Debug, Clone)]
pub struct DataStore {
    value: Value,
    initialized: bool,
    limit: usize,
}

impl Default for DataStore {
    fn default() -> Self {
        DataStore::new(DEFAULT_SIZE_LIMIT)
    }
}

impl DataStore {
    /// An empty store (`{}`) that refuses documents larger than `limit` bytes once serialized.
    pub fn new(limit: usize) -> DataStore {
        DataStore {
            value: Value::Object(Map::new()),
            initialized: false,
            limit,
        }
    }

    /// The limit in bytes; the API layer may also use it to cap request bodies.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Replaces the whole document (API `PUT /mmds`); nothing changes on error.
    pub fn put(&mut self, value: Value) -> Result<(), StoreError> {
        if !value.is_object() {
            return Err(StoreError::NotAnObject);
        }
        self.check_size(&value)?;
        self.value = value;
        self.initialized = true;
        Ok(())
    }

    /// Applies an RFC 7396 merge patch (API `PATCH /mmds`); nothing changes on error.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        if !self.initialized {
            return Err(StoreError::NotInitialized);
        }
        let mut patched = self.value.clone();
        merge_patch(&mut patched, patch);
        if !patched.is_object() {
            return Err(StoreError::NotAnObject);
        }
        self.check_size(&patched)?;
        self.value = patched;
        Ok(())
    }

    /// The document (API `GET /mmds`); `{}` until the first `put`.
    pub fn get(&self) -> &Value {
        &self.value
    }

    fn check_size(&self, value: &Value) -> Result<(), StoreError> {
        let size = serialized_len(value);
        if size > self.limit {
            return Err(StoreError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Renders the value at a URL path (`/a/b`, trailing `/` allowed, `//` collapsed).
    pub(crate) fn lookup(&self, path: &str, format: Format) -> Result<String, LookupError> {
        let pointer = json_pointer(path);
        let value = self.value.pointer(&pointer).ok_or(LookupError::NotFound)?;
        match format {
            Format::Json => Ok(value.to_string()),
            Format::Imds => imds_text(value),
        }
    }
}

/// Turns a request path into a JSON pointer: runs of `/` count as one and a trailing `/` is
/// ignored, so `/latest//meta-data/` names the same value as `/latest/meta-data`.
fn json_pointer(path: &str) -> String {
    let mut pointer = String::with_capacity(path.len() + 1);
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        pointer.push('/');
        pointer.push_str(segment);
    }
    pointer
}

/// EC2's text format: an object lists its keys one a line (objects get a trailing `/`), a
/// string is itself; numbers, booleans, arrays and null have no IMDS form (Firecracker: 501).
fn imds_text(value: &Value) -> Result<String, LookupError> {
    match value {
        Value::Object(map) => {
            let keys: Vec<String> = map
                .iter()
                .map(|(key, child)| {
                    if child.is_object() {
                        format!("{key}/")
                    } else {
                        key.clone()
                    }
                })
                .collect();
            Ok(keys.join("\n"))
        }
        Value::String(text) => Ok(text.clone()),
        _ => Err(LookupError::UnsupportedType),
    }
}

/// RFC 7396: objects merge key by key, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Length of the compact serialization, counted without building the string.
fn serialized_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Serializing a `Value` into a writer that never fails cannot fail either.
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_requires_object_and_respects_limit() {
        let mut store = DataStore::new(20);
        assert_eq!(store.put(json!("x")), Err(StoreError::NotAnObject));
        assert_eq!(store.put(json!([1])), Err(StoreError::NotAnObject));
        let big = json!({"k": "0123456789abcdef"});
        let err = store.put(big).expect_err("too large");
        assert!(matches!(err, StoreError::TooLarge { limit: 20, .. }));
        assert_eq!(err.status_code(), 413);
        assert_eq!(StoreError::NotAnObject.status_code(), 400);
        store.put(json!({"a": "b"})).expect("small object fits");
        assert_eq!(store.get(), &json!({"a": "b"}));
    }

    #[test]
    fn patch_before_put_is_refused() {
        let mut store = DataStore::default();
        assert_eq!(
            store.patch(&json!({"a": 1})),
            Err(StoreError::NotInitialized)
        );
        assert_eq!(store.get(), &json!({}));
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut store = DataStore::default();
        store
            .put(json!({"a": "b", "c": {"d": "e", "f": "g"}}))
            .expect("put");
        store
            .patch(&json!({"a": "z", "c": {"f": null}, "n": {"x": 1}}))
            .expect("patch");
        assert_eq!(
            store.get(),
            &json!({"a": "z", "c": {"d": "e"}, "n": {"x": 1}})
        );
        assert_eq!(store.patch(&json!("scalar")), Err(StoreError::NotAnObject));
        // A patch that would exceed the limit leaves the document untouched.
        let mut small = DataStore::new(30);
        small.put(json!({"a": "b"})).expect("put");
        assert!(matches!(
            small.patch(&json!({"long": "0123456789012345678901234567890"})),
            Err(StoreError::TooLarge { .. })
        ));
        assert_eq!(small.get(), &json!({"a": "b"}));
    }

    #[test]
    fn lookup_formats() {
        let mut store = DataStore::default();
        store
            .put(json!({
                "latest": {"meta-data": {"ami-id": "ami-1", "net": {}}, "n": 3},
                "list": ["x", "y"],
                "t": true,
                "nul": null
            }))
            .expect("put");
        assert_eq!(
            store.lookup("/latest", Format::Imds),
            Ok("meta-data/\nn".into())
        );
        assert_eq!(
            store.lookup("//latest//meta-data/", Format::Imds),
            Ok("ami-id\nnet/".into())
        );
        assert_eq!(
            store.lookup("/latest/meta-data/ami-id", Format::Imds),
            Ok("ami-1".into())
        );
        assert_eq!(
            store.lookup("/latest/meta-data/ami-id", Format::Json),
            Ok("\"ami-1\"".into())
        );
        assert_eq!(store.lookup("/latest/n", Format::Json), Ok("3".into()));
        for path in ["/latest/n", "/list", "/t", "/nul"] {
            assert_eq!(
                store.lookup(path, Format::Imds),
                Err(LookupError::UnsupportedType)
            );
        }
        assert_eq!(store.lookup("/list/1", Format::Imds), Ok("y".into()));
        assert_eq!(
            store.lookup("/missing", Format::Json),
            Err(LookupError::NotFound)
        );
        assert_eq!(
            store.lookup("/", Format::Imds),
            Ok("latest/\nlist\nnul\nt".into())
        );
    }
}
