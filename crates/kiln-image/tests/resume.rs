//! Resuming half-downloaded layers with HTTP range requests, against a real registry
//! (Debian's docker-registry) behind a small proxy that cuts, counts and edits the traffic.

mod common;

use common::{
    blob_files, file_digest, layer, partial_files, partial_synced, quiet, store, Proxy,
    ProxyOptions, Registry,
};
use kiln_image::oci::{BuiltImage, ImageBuilder, LayerBuilder};
use kiln_image::{Compression, Store};

/// A small layer and a big one that does not compress (`size` bytes of file content).
fn image_with_big_layer(seed: u64, size: usize) -> BuiltImage {
    let mut big = LayerBuilder::new();
    big.file("big", 0o644, &common::random_bytes(size, seed))
        .expect("big file");
    ImageBuilder::new()
        .layer(layer(&format!("small-{seed}"), Compression::Gzip))
        .layer(big.finish(Compression::None).expect("big layer"))
        .build()
        .expect("image")
}

/// Pulls through a proxy that goes down after `cut` response bytes on one connection: the
/// pull fails in the middle of the big layer (reconnecting fails too) and leaves a partial
/// file. Returns its recorded length.
fn interrupted_pull(registry: &Registry, repo: &str, store: &Store, big: &str, cut: u64) -> u64 {
    let cutter = Proxy::start(
        &registry.addr,
        ProxyOptions {
            cut_after: Some(cut),
            down_after_cut: true,
            ..ProxyOptions::default()
        },
    );
    let err = store
        .pull(&format!("{}/{repo}:latest", cutter.addr), &quiet())
        .expect_err("a pull whose link goes down");
    eprintln!("expected error: {err}");
    // Names the blob and says it resumes (another layer cut at the same moment may be the
    // one reported).
    let text = err.to_string();
    assert!(text.contains("blob"), "about a blob: {text}");
    assert!(
        !text.contains(big) || text.contains("resumes"),
        "says it resumes: {text}"
    );
    assert!(!store.has_blob(big));
    let synced = partial_synced(store, big);
    assert!(
        synced > 0,
        "a partial file with a record: {:?}",
        partial_files(store)
    );
    synced
}

/// The blob is in the store and its content has its digest.
fn assert_blob_stored(store: &Store, digest: &str) {
    let path = store.blob_path(digest).expect("stored blob");
    assert_eq!(file_digest(&path), digest, "the stored blob verifies");
}

/// No partial download is left behind.
fn assert_no_partial_files(store: &Store) {
    let left = partial_files(store);
    assert!(left.is_empty(), "partial files left: {left:?}");
}

/// The access-log lines of a blob's GETs ("... 206 <bytes> ...").
fn blob_log(registry: &Registry, repo: &str, digest: &str) -> Vec<String> {
    let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
    std::fs::read_to_string(&registry.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn dropped_connection_resumes_with_a_range() {
    let registry = Registry::start();
    let image = image_with_big_layer(21, 4 << 20);
    registry.push("drop", "latest", &image);
    let big = &image.layers[1].blob;
    let size = big.data.len() as u64;
    let (_dir, store) = store();

    let synced = interrupted_pull(&registry, "drop", &store, &big.digest, 1536 << 10);
    assert!(
        synced >= 1 << 20,
        "most of the cut bytes are kept: {synced}"
    );
    assert!(synced < size);

    // The small layer too, if the cut caught it before it was stored.
    let small = &image.layers[0].blob;
    let others = if store.has_blob(&small.digest) {
        0
    } else {
        small.data.len() as u64
    };
    let counter = Proxy::start(&registry.addr, ProxyOptions::default());
    // Plain progress lines (captured by the test harness) say where it resumes.
    let plain = kiln_image::PullOptions {
        progress: kiln_image::ProgressMode::Plain,
        ..quiet()
    };
    let record = store
        .pull(&format!("{}/drop:latest", counter.addr), &plain)
        .expect("resumed pull");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    let path = store.blob_path(&big.digest).expect("path");
    assert_eq!(file_digest(&path), big.digest, "the resumed blob verifies");

    let ranges = counter.blob_ranges(&big.digest);
    assert_eq!(
        ranges,
        [Some(format!("bytes={synced}-"))],
        "one ranged request"
    );
    let served = counter.served();
    eprintln!(
        "big layer {size} bytes, resumed at {synced}: the second pull transferred {served} \
         bytes in all"
    );
    assert!(
        served < size - synced + others + (64 << 10),
        "only the rest was sent: {served} bytes"
    );
    let log = blob_log(&registry, "drop", &big.digest);
    assert!(
        log.last().is_some_and(|l| l.contains("\" 206 ")),
        "{log:#?}"
    );
    assert_no_partial_files(&store);
    assert!(blob_files(&store).iter().all(|f| !f.starts_with('.')));
}

#[test]
fn corrupt_partial_is_fetched_again_from_zero() {
    let registry = Registry::start();
    let image = image_with_big_layer(23, 3 << 20);
    registry.push("flip", "latest", &image);
    let big = &image.layers[1].blob;
    let (_dir, store) = store();

    let synced = interrupted_pull(&registry, "flip", &store, &big.digest, 1 << 20);
    // The disk damages the kept prefix: only the final digest check can tell.
    let hex = &big.digest["sha256:".len()..];
    let data_path = common::partial_dir(&store).join(hex);
    let mut data = std::fs::read(&data_path).expect("partial file");
    let mid = usize::try_from(synced / 2).expect("offset");
    data[mid] ^= 0xff;
    data[mid + 1] ^= 0x55;
    std::fs::write(&data_path, &data).expect("flipping bytes");

    let counter = Proxy::start(&registry.addr, ProxyOptions::default());
    let record = store
        .pull(&format!("{}/flip:latest", counter.addr), &quiet())
        .expect("pull after a corrupt partial file");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_blob_stored(&store, &big.digest);
    assert_eq!(
        counter.blob_ranges(&big.digest),
        [
            Some(format!("bytes={synced}-")),
            Some("bytes=0-".to_string())
        ],
        "resumed, found corrupt at the end, fetched whole once"
    );
    assert_no_partial_files(&store);
}

#[test]
fn registry_ignoring_the_range_still_yields_the_blob() {
    let registry = Registry::start();
    let image = image_with_big_layer(25, 3 << 20);
    registry.push("norange", "latest", &image);
    let big = &image.layers[1].blob;
    let size = big.data.len() as u64;
    let (_dir, store) = store();
    let synced = interrupted_pull(&registry, "norange", &store, &big.digest, 1 << 20);

    let stripper = Proxy::start(
        &registry.addr,
        ProxyOptions {
            strip_range: true,
            ..ProxyOptions::default()
        },
    );
    let record = store
        .pull(&format!("{}/norange:latest", stripper.addr), &quiet())
        .expect("pull from a registry that ignores ranges");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_blob_stored(&store, &big.digest);
    assert_eq!(
        stripper.blob_ranges(&big.digest),
        [Some(format!("bytes={synced}-"))],
        "asked once, with a range"
    );
    let log = blob_log(&registry, "norange", &big.digest);
    assert!(
        log.last().is_some_and(|l| l.contains("\" 200 ")),
        "answered whole: {log:#?}"
    );
    assert!(stripper.served() >= size);
    assert_no_partial_files(&store);
}

#[test]
fn refused_range_starts_over_once() {
    let registry = Registry::start();
    let image = image_with_big_layer(27, 2 << 20);
    registry.push("refuse", "latest", &image);
    let big = &image.layers[1].blob;
    let (_dir, store) = store();
    let synced = interrupted_pull(&registry, "refuse", &store, &big.digest, 1 << 20);

    let refuser = Proxy::start(
        &registry.addr,
        ProxyOptions {
            refuse_ranges: true,
            ..ProxyOptions::default()
        },
    );
    let record = store
        .pull(&format!("{}/refuse:latest", refuser.addr), &quiet())
        .expect("pull after a 416");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_blob_stored(&store, &big.digest);
    assert_eq!(
        refuser.blob_ranges(&big.digest),
        [
            Some(format!("bytes={synced}-")),
            Some("bytes=0-".to_string())
        ]
    );
    assert_no_partial_files(&store);
}

#[test]
fn prune_removes_only_stale_partial_files() {
    let registry = Registry::start();
    let image = image_with_big_layer(29, 2 << 20);
    registry.push("stale", "latest", &image);
    let big = &image.layers[1].blob;
    let (_dir, store) = store();
    let synced = interrupted_pull(&registry, "stale", &store, &big.digest, 1 << 20);
    let hex = &big.digest["sha256:".len()..];

    // Fresh: kept, so the retry still resumes.
    let report = store.prune().expect("prune");
    assert!(
        report.removed.iter().all(|r| !r.starts_with("partial")),
        "{:?}",
        report.removed
    );
    assert_eq!(partial_synced(&store, &big.digest), synced);

    // Untouched for two days: removed, with its record.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
    for name in partial_files(&store) {
        let f = std::fs::File::options()
            .write(true)
            .open(common::partial_dir(&store).join(&name))
            .expect("partial file");
        f.set_modified(old).expect("set mtime");
    }
    let report = store.prune().expect("prune");
    assert!(
        report.removed.contains(&format!("partial sha256:{hex}")),
        "{:?}",
        report.removed
    );
    assert!(report.bytes >= synced);
    assert_no_partial_files(&store);

    // And the next pull simply starts from 0.
    let record = store
        .pull(&registry.reference("stale"), &quiet())
        .expect("pull");
    assert_eq!(record.manifest_digest, image.manifest.digest);
}

#[test]
fn concurrent_pulls_share_one_download_per_blob() {
    let registry = Registry::start();
    let image = image_with_big_layer(31, 2 << 20);
    registry.push("shared", "latest", &image);
    let big = &image.layers[1].blob;
    let (dir, store) = store();
    // Slow enough that the pulls overlap on the big layer.
    let slow = Proxy::start(
        &registry.addr,
        ProxyOptions {
            throttle: Some(std::time::Duration::from_millis(5)),
            ..ProxyOptions::default()
        },
    );
    let reference = format!("{}/shared:latest", slow.addr);
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (root, reference) = (dir.path().to_path_buf(), reference.clone());
            std::thread::spawn(move || Store::open(&root).expect("open").pull(&reference, &quiet()))
        })
        .collect();
    for t in threads {
        let record = t.join().expect("thread").expect("concurrent pull");
        assert_eq!(record.manifest_digest, image.manifest.digest);
    }
    assert_blob_stored(&store, &big.digest);
    // One writer per partial file: the others waited for it and found the blob stored.
    assert_eq!(slow.blob_ranges(&big.digest).len(), 1);
    assert_no_partial_files(&store);
}

#[test]
fn flaky_link_is_resumed_within_one_pull() {
    let registry = Registry::start();
    let image = image_with_big_layer(33, 3 << 20);
    registry.push("flaky", "latest", &image);
    let big = &image.layers[1].blob;
    let size = big.data.len() as u64;
    let (_dir, store) = store();
    // Every connection breaks after 700 kB: the pull reconnects and resumes each time.
    let flaky = Proxy::start(
        &registry.addr,
        ProxyOptions {
            cut_after: Some(700_000),
            ..ProxyOptions::default()
        },
    );
    let record = store
        .pull(&format!("{}/flaky:latest", flaky.addr), &quiet())
        .expect("pull over a flaky link");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_blob_stored(&store, &big.digest);
    let offsets: Vec<u64> = flaky
        .blob_ranges(&big.digest)
        .into_iter()
        .map(|r| {
            r.as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse().ok())
                .expect("an open range")
        })
        .collect();
    eprintln!("big layer {size} bytes, requested from {offsets:?}");
    assert!(offsets.len() >= 4, "{offsets:?}");
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    let total: u64 = image
        .layers
        .iter()
        .map(|l| l.blob.data.len() as u64)
        .sum::<u64>()
        + image.config.data.len() as u64
        + image.manifest.data.len() as u64;
    assert!(
        flaky.served() < total + (64 << 10),
        "nothing sent twice: {} of {total}",
        flaky.served()
    );
    assert_no_partial_files(&store);
}

#[test]
fn a_short_outage_is_ridden_out() {
    let registry = Registry::start();
    let image = image_with_big_layer(35, 2 << 20);
    registry.push("outage", "latest", &image);
    let big = &image.layers[1].blob;
    let (_dir, store) = store();
    // After 1 MiB the link goes away for 1.2 s: every connection drops, new ones are
    // refused; the pull keeps trying (0.5, 1, 2 s apart) and resumes when it is back.
    let proxy = Proxy::start(
        &registry.addr,
        ProxyOptions {
            cut_after: Some(1 << 20),
            down_after_cut: true,
            outage: Some(std::time::Duration::from_millis(1200)),
            ..ProxyOptions::default()
        },
    );
    let record = store
        .pull(&format!("{}/outage:latest", proxy.addr), &quiet())
        .expect("pull across an outage");
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_blob_stored(&store, &big.digest);
    let ranges = proxy.blob_ranges(&big.digest);
    eprintln!("requests for the big layer: {ranges:?}");
    assert_eq!(ranges.first(), Some(&Some("bytes=0-".to_string())));
    assert!(
        ranges
            .last()
            .and_then(|r| r.as_deref())
            .is_some_and(|r| r != "bytes=0-"),
        "resumed after the outage: {ranges:?}"
    );
    assert_no_partial_files(&store);
}
