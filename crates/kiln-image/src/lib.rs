//! OCI images for kiln: pulling from registries, importing, and a content-addressed store.
