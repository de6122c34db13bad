//! Root filesystems for kiln: OCI layers applied safely into a directory, then an ext4 disk.
