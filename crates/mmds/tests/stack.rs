//! Drives `MmdsNetworkStack` with real Ethernet frames, as a guest kernel would send them.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mmds::{Mmds, MmdsConfig, MmdsNetworkStack, StackLimits, DEFAULT_IPV4, DEFAULT_MAC};
use serde_json::json;

const GUEST_MAC: [u8; 6] = [0xaa, 0xfc, 0, 0, 0, 1];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

// ---- a tiny guest-side frame builder and parser, independent of the crate's own ----

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> u32 {
    sum16(&src.octets(), sum16(&dst.octets(), 6 + len as u32))
}

fn ethernet(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = dst.to_vec();
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn arp_request(target: Ipv4Addr, op: u16) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4];
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    arp.resize(46, 0); // Ethernet minimum-size padding
    ethernet([0xff; 6], 0x0806, &arp)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = finish(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(payload);
    ip
}

struct Out<'a> {
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: &'a [u8],
    payload: &'a [u8],
}

fn tcp_segment(dst_ip: Ipv4Addr, s: &Out<'_>) -> Vec<u8> {
    let header = 20 + s.options.len();
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&s.src_port.to_be_bytes());
    tcp.extend_from_slice(&s.dst_port.to_be_bytes());
    tcp.extend_from_slice(&s.seq.to_be_bytes());
    tcp.extend_from_slice(&s.ack.to_be_bytes());
    tcp.push(((header / 4) as u8) << 4);
    tcp.push(s.flags);
    tcp.extend_from_slice(&s.window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(s.options);
    tcp.extend_from_slice(s.payload);
    let sum = finish(sum16(&tcp, pseudo(GUEST_IP, dst_ip, tcp.len())));
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

fn tcp_frame(dst_ip: Ipv4Addr, s: &Out<'_>) -> Vec<u8> {
    let tcp = tcp_segment(dst_ip, s);
    ethernet(DEFAULT_MAC, 0x0800, &ipv4(GUEST_IP, dst_ip, 6, &tcp))
}

/// A segment the stack sent, after checking every header and checksum.
#[derive(Debug, Clone)]
struct Seg {
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

fn parse_out(frame: &[u8]) -> Seg {
    assert_eq!(&frame[0..6], &GUEST_MAC, "to the guest");
    assert_eq!(&frame[6..12], &DEFAULT_MAC, "from the service");
    assert_eq!(&frame[12..14], &[8, 0], "IPv4");
    let ip = &frame[14..];
    assert_eq!(ip[0], 0x45);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(total, ip.len());
    assert_eq!(finish(sum16(&ip[..20], 0)), 0, "IPv4 checksum");
    assert_eq!(&ip[12..16], &DEFAULT_IPV4.octets());
    assert_eq!(&ip[16..20], &GUEST_IP.octets());
    let tcp = &ip[20..];
    assert_eq!(
        finish(sum16(tcp, pseudo(DEFAULT_IPV4, GUEST_IP, tcp.len()))),
        0,
        "TCP checksum"
    );
    assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 80);
    let header = usize::from(tcp[12] >> 4) * 4;
    let mss = (header == 24 && tcp[20] == 2).then(|| u16::from_be_bytes([tcp[22], tcp[23]]));
    Seg {
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        flags: tcp[13],
        window: u16::from_be_bytes([tcp[14], tcp[15]]),
        mss,
        payload: tcp[header..].to_vec(),
    }
}

// ---- a simulated guest ----

struct Harness {
    stack: MmdsNetworkStack,
    mmds: Arc<Mutex<Mmds>>,
    now: Instant,
}

/// The guest's side of one connection.
#[derive(Default, Clone)]
struct Conn {
    port: u16,
    seq: u32,
    ack: u32,
    window: u16,
    /// Bytes received beyond the last response read.
    pending: Vec<u8>,
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Harness {
    fn new(version: &str) -> Harness {
        Harness::with_limits(version, StackLimits::default())
    }

    fn with_limits(version: &str, limits: StackLimits) -> Harness {
        let mut mmds = Mmds::new(mmds::DEFAULT_SIZE_LIMIT).expect("mmds");
        mmds.put(json!({
            "latest": {
                "meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-fea54097", "net": {}},
                "count": 3
            }
        }))
        .expect("put");
        let config: MmdsConfig = serde_json::from_str(&format!(
            r#"{{"version":"{version}","network_interfaces":["eth0"]}}"#
        ))
        .expect("config");
        mmds.apply_config(&config);
        let mmds = Arc::new(Mutex::new(mmds));
        let stack = MmdsNetworkStack::with_limits(DEFAULT_MAC, config.ipv4(), mmds.clone(), limits);
        Harness {
            stack,
            mmds,
            now: Instant::now(),
        }
    }

    fn send(&mut self, frame: &[u8]) -> bool {
        self.stack.handle_frame_at(frame, self.now)
    }

    fn drain(&mut self) -> Vec<Seg> {
        let mut out = Vec::new();
        while let Some(frame) = self.stack.next_frame_at(self.now) {
            out.push(parse_out(&frame));
            assert!(out.len() < 10_000, "runaway output");
        }
        out
    }

    fn segment(&mut self, c: &Conn, flags: u8, payload: &[u8]) -> bool {
        let frame = tcp_frame(
            DEFAULT_IPV4,
            &Out {
                src_port: c.port,
                dst_port: 80,
                seq: c.seq,
                ack: c.ack,
                flags,
                window: c.window,
                options: &[],
                payload,
            },
        );
        self.send(&frame)
    }

    /// Three-way handshake with the given MSS option and window.
    fn connect_with(&mut self, port: u16, mss: u16, window: u16) -> Conn {
        let options = [2, 4, (mss >> 8) as u8, mss as u8];
        let syn = tcp_frame(
            DEFAULT_IPV4,
            &Out {
                src_port: port,
                dst_port: 80,
                seq: 1000,
                ack: 0,
                flags: SYN,
                window,
                options: &options,
                payload: &[],
            },
        );
        assert!(self.send(&syn));
        let out = self.drain();
        assert_eq!(out.len(), 1, "one SYN-ACK");
        let syn_ack = &out[0];
        assert_eq!(syn_ack.flags, SYN | ACK);
        assert_eq!(syn_ack.ack, 1001);
        assert_eq!(syn_ack.dst_port, port);
        assert_eq!(syn_ack.mss, Some(1460));
        assert!(syn_ack.window > 0);
        let c = Conn {
            port,
            seq: 1001,
            ack: syn_ack.seq.wrapping_add(1),
            window,
            pending: Vec::new(),
        };
        assert!(self.segment(&c, ACK, &[]));
        assert!(self.drain().is_empty(), "a bare ACK needs no answer");
        c
    }

    fn connect(&mut self, port: u16) -> Conn {
        self.connect_with(port, 1460, 65535)
    }

    /// Sends `payload` in one segment.
    fn write(&mut self, c: &mut Conn, payload: &[u8]) {
        assert!(self.segment(c, ACK, payload));
        c.seq = c.seq.wrapping_add(payload.len() as u32);
    }

    /// Reads one HTTP response, ACKing data as it arrives.
    fn read_response(&mut self, c: &mut Conn) -> Response {
        let mut bytes = std::mem::take(&mut c.pending);
        for _ in 0..1000 {
            let out = self.drain();
            let mut got_data = false;
            for seg in out {
                if seg.payload.is_empty() {
                    continue;
                }
                assert_eq!(seg.seq, c.ack, "in-order data");
                c.ack = c.ack.wrapping_add(seg.payload.len() as u32);
                bytes.extend_from_slice(&seg.payload);
                got_data = true;
            }
            if let Some((response, used)) = parse_response(&bytes) {
                c.pending = bytes[used..].to_vec();
                assert!(self.segment(c, ACK, &[]));
                return response;
            }
            assert!(got_data, "stalled: {:?}", String::from_utf8_lossy(&bytes));
            assert!(self.segment(c, ACK, &[]));
        }
        panic!("no complete response");
    }

    fn request(&mut self, c: &mut Conn, raw: &str) -> Response {
        self.write(c, raw.as_bytes());
        self.read_response(c)
    }
}

/// The first response in `bytes` and its length, once it is all there.
fn parse_response(bytes: &[u8]) -> Option<(Response, usize)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8(bytes[..end - 4].to_vec()).ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))?
        .parse()
        .ok()?;
    let body = bytes.get(end..end + length)?;
    let response = Response {
        status: head[9..12].parse().ok()?,
        head,
        body: String::from_utf8(body.to_vec()).ok()?,
    };
    Some((response, end + length))
}

/// The one response `bytes` holds, with nothing after it.
fn complete(bytes: &[u8]) -> Option<Response> {
    let (response, used) = parse_response(bytes)?;
    assert_eq!(used, bytes.len(), "no bytes beyond the response");
    Some(response)
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}\r\n")
}

// ---- tests ----

#[test]
fn arp_resolution() {
    let mut h = Harness::new("V1");
    assert!(h.send(&arp_request(DEFAULT_IPV4, 1)));
    let reply = h.stack.next_frame_at(h.now).expect("ARP reply");
    assert!(h.stack.next_frame_at(h.now).is_none());
    assert_eq!(&reply[0..6], &GUEST_MAC);
    assert_eq!(&reply[6..12], &DEFAULT_MAC);
    assert_eq!(&reply[12..14], &[8, 6]);
    let arp = &reply[14..];
    assert_eq!(&arp[6..8], &[0, 2], "reply opcode");
    assert_eq!(&arp[8..14], &DEFAULT_MAC, "sender MAC");
    assert_eq!(&arp[14..18], &DEFAULT_IPV4.octets(), "sender IP");
    assert_eq!(&arp[18..24], &GUEST_MAC, "target MAC");
    assert_eq!(&arp[24..28], &GUEST_IP.octets(), "target IP");

    // Not ours: other addresses, ARP replies, truncated ARP.
    assert!(!h.send(&arp_request(Ipv4Addr::new(10, 0, 0, 1), 1)));
    assert!(!h.send(&arp_request(DEFAULT_IPV4, 2)));
    let short = arp_request(DEFAULT_IPV4, 1);
    assert!(!h.send(&short[..14 + 20]));
    assert!(h.stack.next_frame_at(h.now).is_none());
}

#[test]
fn foreign_traffic_is_left_alone() {
    let mut h = Harness::new("V2");
    let other = Ipv4Addr::new(10, 0, 0, 1);
    let seg = Out {
        src_port: 5000,
        dst_port: 80,
        seq: 1,
        ack: 0,
        flags: SYN,
        window: 1000,
        options: &[],
        payload: &[],
    };
    assert!(!h.send(&tcp_frame(other, &seg)), "other host");
    let to_443 = Out {
        dst_port: 443,
        ..seg
    };
    assert!(!h.send(&tcp_frame(DEFAULT_IPV4, &to_443)), "other port");
    let udp = ethernet(
        DEFAULT_MAC,
        0x0800,
        &ipv4(GUEST_IP, DEFAULT_IPV4, 17, &[0; 8]),
    );
    assert!(!h.send(&udp), "UDP");
    assert!(!h.send(&ethernet(DEFAULT_MAC, 0x86dd, &[0x60; 40])), "IPv6");
    assert!(!h.send(&[]));
    assert!(!h.send(&[0; 13]));
    assert!(h.drain().is_empty());
}

#[test]
fn v2_session_flow() {
    let mut h = Harness::new("V2");
    let mut c = h.connect(40000);

    let r = h.request(&mut c, &get("/latest/meta-data/ami-id", ""));
    assert_eq!(r.status, 401, "{}", r.body);

    let put = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n";
    let r = h.request(&mut c, put);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.head.contains("Content-Type: text/plain"));
    assert!(r.head.contains("X-metadata-token-ttl-seconds: 60"));
    let token = r.body;
    assert!(token.len() >= 43, "at least 32 bytes of base64: {token}");

    let auth = format!("X-metadata-token: {token}\r\n");
    let r = h.request(&mut c, &get("/latest/meta-data/ami-id", &auth));
    assert_eq!((r.status, r.body.as_str()), (200, "ami-12345678"));
    let r = h.request(&mut c, &get("/latest/meta-data/", &auth));
    assert_eq!(r.body, "ami-id\nnet/\nreservation-id");
    let r = h.request(
        &mut c,
        &get(
            "/latest/meta-data",
            &format!("{auth}Accept: application/json\r\n"),
        ),
    );
    assert_eq!(r.status, 200);
    assert!(r.head.contains("Content-Type: application/json"));
    let value: serde_json::Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(value["ami-id"], "ami-12345678");
    let aws = format!("X-aws-ec2-metadata-token: {token}\r\n");
    assert_eq!(h.request(&mut c, &get("/latest/count", &aws)).status, 501);
    let r = h.request(&mut c, &get("/latest/missing", &auth));
    assert_eq!(r.status, 404);

    let r = h.request(&mut c, &get("/", "X-metadata-token: bogus\r\n"));
    assert_eq!(r.status, 401);

    for ttl in ["0", "21601", "-1", "ten", ""] {
        let put = format!(
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
        );
        assert_eq!(h.request(&mut c, &put).status, 400, "ttl {ttl:?}");
    }
    let put = "PUT /latest/api/token HTTP/1.1\r\n\r\n";
    assert_eq!(h.request(&mut c, put).status, 400, "no ttl");
    let put = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\
               X-Forwarded-For: 203.0.113.195\r\n\r\n";
    assert_eq!(h.request(&mut c, put).status, 400, "forwarded");
    let put = "PUT /latest/api/other HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n";
    assert_eq!(h.request(&mut c, put).status, 404);
    let r = h.request(&mut c, "POST / HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 405);
    assert!(r.head.contains("Allow: GET, PUT"));

    // The token expires after its TTL (on the stack's clock).
    let put = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 1\r\n\r\n";
    let short = h.request(&mut c, put).body;
    let auth = format!("X-metadata-token: {short}\r\n");
    assert_eq!(h.request(&mut c, &get("/latest", &auth)).status, 200);
    h.now += Duration::from_secs(2);
    assert_eq!(h.request(&mut c, &get("/latest", &auth)).status, 401);
}

#[test]
fn v1_reads_need_no_token() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40001);
    let r = h.request(&mut c, &get("/latest/meta-data/ami-id", ""));
    assert_eq!((r.status, r.body.as_str()), (200, "ami-12345678"));
    let r = h.request(&mut c, &get("/latest", "X-metadata-token: invalid\r\n"));
    assert_eq!((r.status, r.body.as_str()), (200, "count\nmeta-data/"));
    // V1 also hands out tokens, as Firecracker does, to ease migration to V2.
    let put = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n";
    assert_eq!(h.request(&mut c, put).status, 200);
}

#[test]
fn v1_style_requests_are_refused_under_v2() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40002);
    assert_eq!(h.request(&mut c, &get("/latest", "")).status, 200);
    let v2: MmdsConfig =
        serde_json::from_str(r#"{"version":"V2","network_interfaces":["eth0"]}"#).expect("cfg");
    h.mmds.lock().expect("lock").apply_config(&v2);
    let r = h.request(&mut c, &get("/latest", ""));
    assert_eq!(r.status, 401);
    assert!(r.body.contains("No MMDS token provided"));
}

#[test]
fn imds_compat_ignores_accept() {
    let mut h = Harness::new("V1");
    let compat: MmdsConfig =
        serde_json::from_str(r#"{"network_interfaces":["eth0"],"imds_compat":true}"#).expect("cfg");
    h.mmds.lock().expect("lock").apply_config(&compat);
    let mut c = h.connect(40003);
    let r = h.request(&mut c, &get("/latest", "Accept: application/json\r\n"));
    assert_eq!(r.body, "count\nmeta-data/");
    assert!(r.head.contains("Content-Type: text/plain"));
}

#[test]
fn request_split_across_segments() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40004);
    let raw = get("/latest/meta-data/reservation-id", "Accept: text/plain\r\n");
    let (last, rest) = raw.as_bytes().split_last().expect("bytes");
    for chunk in rest.chunks(3) {
        h.write(&mut c, chunk);
        let out = h.drain();
        assert!(
            out.iter().all(|s| s.payload.is_empty()),
            "no answer before the request is complete"
        );
        assert_eq!(out.last().map(|s| s.ack), Some(c.seq), "each chunk ACKed");
    }
    h.write(&mut c, &[*last]);
    let r = h.read_response(&mut c);
    assert_eq!((r.status, r.body.as_str()), (200, "r-fea54097"));
}

#[test]
fn large_response_respects_mss_and_window() {
    let mut h = Harness::new("V1");
    let big: String = "x".repeat(5000);
    h.mmds
        .lock()
        .expect("lock")
        .put(json!({"big": big}))
        .expect("put");
    let (mss, window) = (100u16, 250u16);
    let mut c = h.connect_with(40005, mss, window);
    h.write(&mut c, get("/big", "").as_bytes());

    let mut received = Vec::new();
    let mut rounds = 0;
    loop {
        let out = h.drain();
        let data: Vec<&Seg> = out.iter().filter(|s| !s.payload.is_empty()).collect();
        if data.is_empty() {
            break;
        }
        let mut in_flight = 0;
        for seg in data {
            assert!(seg.payload.len() <= usize::from(mss), "MSS respected");
            assert_eq!(seg.seq, c.ack.wrapping_add(in_flight as u32));
            in_flight += seg.payload.len();
            received.extend_from_slice(&seg.payload);
        }
        assert!(in_flight <= usize::from(window), "window respected");
        c.ack = c.ack.wrapping_add(in_flight as u32);
        assert!(h.segment(&c, ACK, &[]));
        rounds += 1;
    }
    let response = complete(&received).expect("whole response");
    assert_eq!(response.body, big);
    assert!(rounds >= 20, "flow control took {rounds} rounds");
}

#[test]
fn zero_window_is_probed() {
    let mut h = Harness::new("V1");
    let mut c = h.connect_with(40006, 1460, 0);
    h.write(&mut c, get("/latest/meta-data/ami-id", "").as_bytes());
    let out = h.drain();
    assert!(out.iter().all(|s| s.payload.is_empty()), "window closed");
    let deadline = h.stack.next_timeout().expect("persist timer");
    h.now = deadline;
    h.stack.on_timer(h.now);
    let probe = h.drain();
    assert_eq!(probe.len(), 1);
    assert_eq!(probe[0].payload.len(), 1, "one-byte probe");
    // The guest opens its window: the rest follows.
    c.window = 4096;
    assert!(h.segment(&c, ACK, &[]));
    let r = h.read_response(&mut c);
    assert_eq!(r.body, "ami-12345678");
}

#[test]
fn lost_segment_is_retransmitted() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40007);
    h.write(&mut c, get("/latest/meta-data/ami-id", "").as_bytes());
    let first: Vec<Seg> = h.drain();
    let data: Vec<&Seg> = first.iter().filter(|s| !s.payload.is_empty()).collect();
    assert_eq!(data.len(), 1);
    let lost = data[0].clone();
    // The guest never saw it: no ACK. Nothing more until the timer fires.
    assert!(h.stack.next_frame_at(h.now).is_none());
    let deadline = h.stack.next_timeout().expect("retransmission timer");
    assert!(deadline > h.now);
    h.now = deadline - Duration::from_millis(1);
    h.stack.on_timer(h.now);
    assert!(h.drain().is_empty(), "not yet");
    h.now = deadline;
    h.stack.on_timer(h.now);
    let again = h.drain();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].seq, lost.seq);
    assert_eq!(again[0].payload, lost.payload);
    // Backoff: the next retransmission waits longer.
    let next = h.stack.next_timeout().expect("timer re-armed");
    assert!(next - h.now >= Duration::from_millis(400), "RTO doubled");
    c.ack = c.ack.wrapping_add(lost.payload.len() as u32);
    assert!(h.segment(&c, ACK, &[]));
    let body = complete(&lost.payload).expect("response").body;
    assert_eq!(body, "ami-12345678");
    assert!(h.drain().is_empty());
}

#[test]
fn retransmissions_give_up_with_a_reset() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40008);
    h.write(&mut c, get("/", "").as_bytes());
    h.drain();
    let mut resets = 0;
    for _ in 0..20 {
        // Keep the connection from idling out: only retransmissions are unanswered.
        let Some(deadline) = h.stack.next_timeout() else {
            break;
        };
        h.now = deadline;
        h.stack.on_timer(h.now);
        resets += h.drain().iter().filter(|s| s.flags & RST != 0).count();
    }
    assert_eq!(resets, 1);
    assert_eq!(h.stack.connection_count(), 0);
}

#[test]
fn http10_closes_with_fin() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40009);
    h.write(&mut c, b"GET /latest/meta-data/ami-id HTTP/1.0\r\n\r\n");
    let out = h.drain();
    let data: Vec<u8> = out.iter().flat_map(|s| s.payload.clone()).collect();
    let r = complete(&data).expect("response");
    assert!(r.head.starts_with("HTTP/1.0 200"));
    assert!(r.head.contains("Connection: close"));
    let fin = out.last().expect("segments");
    assert_ne!(fin.flags & FIN, 0, "FIN after the response");
    c.ack = fin.seq.wrapping_add(fin.payload.len() as u32 + 1);
    // Guest ACKs our FIN and closes too.
    assert!(h.segment(&c, ACK | FIN, &[]));
    let last = h.drain();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].flags, ACK);
    assert_eq!(last[0].ack, c.seq.wrapping_add(1));
    assert_eq!(h.stack.connection_count(), 0);
}

#[test]
fn guest_initiated_close() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40010);
    let r = h.request(&mut c, &get("/latest/meta-data/ami-id", ""));
    assert_eq!(r.status, 200);
    assert!(h.segment(&c, ACK | FIN, &[]));
    c.seq = c.seq.wrapping_add(1);
    let out = h.drain();
    let fin = out.iter().find(|s| s.flags & FIN != 0).expect("our FIN");
    assert_eq!(fin.ack, c.seq);
    c.ack = fin.seq.wrapping_add(1);
    assert!(h.segment(&c, ACK, &[]));
    assert!(h.drain().is_empty());
    assert_eq!(h.stack.connection_count(), 0);
}

#[test]
fn half_close_with_partial_request_gets_400() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40011);
    h.write(&mut c, b"GET /latest HTTP/1.1\r\nHost: x\r\n");
    assert!(h.segment(&c, ACK | FIN, &[]));
    let out = h.drain();
    let data: Vec<u8> = out.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(complete(&data).expect("response").status, 400);
    assert!(out.iter().any(|s| s.flags & FIN != 0));
}

#[test]
fn resets() {
    let mut h = Harness::new("V1");
    let c = h.connect(40012);
    // An in-window but inexact RST draws a challenge ACK (RFC 5961) and changes nothing.
    let mut off = Conn {
        seq: c.seq.wrapping_add(10),
        ..c.clone()
    };
    assert!(h.segment(&off, RST, &[]));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].flags, ACK);
    assert_eq!(h.stack.connection_count(), 1);
    // Far outside the window: ignored silently.
    off.seq = c.seq.wrapping_add(0x8000_0000);
    assert!(h.segment(&off, RST, &[]));
    assert!(h.drain().is_empty());
    // The exact one tears the connection down, silently.
    assert!(h.segment(&c, RST, &[]));
    assert!(h.drain().is_empty());
    assert_eq!(h.stack.connection_count(), 0);
    // A RST flood for unknown connections produces nothing.
    for i in 0..1000u32 {
        let stray = Conn {
            port: 50000 + (i % 100) as u16,
            seq: i.wrapping_mul(7919),
            ack: i,
            window: 0,
            pending: Vec::new(),
        };
        assert!(h.segment(&stray, RST | ACK, &[]));
    }
    assert!(h.drain().is_empty());
    // Data for an unknown connection is answered with a RST carrying its ACK number.
    let stray = Conn {
        port: 40013,
        seq: 5,
        ack: 777,
        window: 100,
        pending: Vec::new(),
    };
    assert!(h.segment(&stray, ACK, b"hello"));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].flags, out[0].seq), (RST, 777));
}

#[test]
fn connection_limit() {
    let limits = StackLimits::default();
    let mut h = Harness::new("V1");
    let mut conns = Vec::new();
    for i in 0..limits.max_connections {
        conns.push(h.connect(41000 + i as u16));
    }
    assert_eq!(h.stack.connection_count(), limits.max_connections);
    let syn = tcp_frame(
        DEFAULT_IPV4,
        &Out {
            src_port: 42000,
            dst_port: 80,
            seq: 9,
            ack: 0,
            flags: SYN,
            window: 1000,
            options: &[],
            payload: &[],
        },
    );
    assert!(h.send(&syn));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].flags, RST | ACK);
    assert_eq!(out[0].ack, 10);
    // Existing connections still work.
    let mut c = conns.pop().expect("a connection");
    assert_eq!(h.request(&mut c, &get("/latest", "")).status, 200);
    // Closing one frees a slot.
    assert!(h.segment(&c, RST, &[]));
    assert!(h.send(&syn));
    assert_eq!(h.drain()[0].flags, SYN | ACK);
}

#[test]
fn syn_flood_is_bounded() {
    let mut h = Harness::with_limits(
        "V1",
        StackLimits {
            max_connections: 5,
            max_pending_resets: 10,
            idle_timeout: Duration::from_secs(60),
        },
    );
    for port in 0..2000u16 {
        let syn = tcp_frame(
            DEFAULT_IPV4,
            &Out {
                src_port: port,
                dst_port: 80,
                seq: u32::from(port) * 1000,
                ack: 0,
                flags: SYN,
                window: 1000,
                options: &[2, 4, 0, 0],
                payload: &[],
            },
        );
        assert!(h.send(&syn));
    }
    assert_eq!(h.stack.connection_count(), 5);
    let out = h.drain();
    assert_eq!(out.iter().filter(|s| s.flags == SYN | ACK).count(), 5);
    assert_eq!(out.iter().filter(|s| s.flags & RST != 0).count(), 10);
    // Half-open connections are forgotten after their SYN-ACK retries.
    for _ in 0..20 {
        if let Some(deadline) = h.stack.next_timeout() {
            h.now = deadline;
            h.stack.on_timer(h.now);
            h.drain();
        }
    }
    assert_eq!(h.stack.connection_count(), 0);
}

#[test]
fn idle_connections_are_dropped() {
    let mut h = Harness::new("V1");
    let _c = h.connect(40014);
    h.now += Duration::from_secs(61);
    h.stack.on_timer(h.now);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_ne!(out[0].flags & RST, 0);
    assert_eq!(h.stack.connection_count(), 0);
    assert!(h.stack.next_timeout().is_none());
}

#[test]
fn hostile_sequence_numbers_and_windows() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40015);
    // A huge jump: not in the window, answered with an ACK for what we expect.
    let far = Conn {
        seq: c.seq.wrapping_add(0x4000_0000),
        ..c.clone()
    };
    assert!(h.segment(&far, ACK, b"GET / HTTP/1.1\r\n\r\n"));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].ack, out[0].payload.len()), (c.seq, 0));
    // Out of order (just ahead): dropped with a duplicate ACK.
    let ahead = Conn {
        seq: c.seq.wrapping_add(5),
        ..c.clone()
    };
    assert!(h.segment(&ahead, ACK, b"xxxx"));
    assert_eq!(h.drain()[0].ack, c.seq);
    // ACK of data never sent: ignored with an ACK.
    let bogus_ack = Conn {
        ack: c.ack.wrapping_add(100_000),
        ..c.clone()
    };
    assert!(h.segment(&bogus_ack, ACK, &[]));
    assert_eq!(h.drain().len(), 1);
    // SYN on an established connection: challenge ACK, connection kept.
    assert!(h.segment(&c, SYN, &[]));
    assert_eq!(h.drain()[0].flags, ACK);
    // Retransmitted (old) data is ACKed, not appended twice.
    h.write(&mut c, b"GET /latest HTTP/1.1\r\n");
    h.drain();
    let old = Conn {
        seq: c.seq.wrapping_sub(4),
        ..c.clone()
    };
    assert!(h.segment(&old, ACK, b"1\r\n\r"));
    h.drain();
    // Overlapping retransmission that also brings new bytes: only the new ones count.
    let overlap = Conn {
        seq: c.seq.wrapping_sub(2),
        ..c.clone()
    };
    assert!(h.segment(&overlap, ACK, b"\r\n\r\n"));
    c.seq = c.seq.wrapping_add(2);
    let r = h.read_response(&mut c);
    assert_eq!((r.status, r.body.as_str()), (200, "count\nmeta-data/"));
    assert_eq!(h.stack.connection_count(), 1);
}

#[test]
fn oversized_request_is_refused() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40016);
    let mut raw = b"GET /".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 5000));
    // The advertised window (4 KiB) caps what is accepted; the rest is not ACKed.
    for chunk in raw.chunks(1000) {
        h.write(&mut c, chunk);
    }
    let out = h.drain();
    let data: Vec<u8> = out.iter().flat_map(|s| s.payload.clone()).collect();
    let r = complete(&data).expect("response");
    assert_eq!(r.status, 413);
    assert!(out.iter().any(|s| s.flags & FIN != 0), "then closed");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40017);
    let both = format!(
        "{}{}",
        get("/latest/meta-data/ami-id", ""),
        get("/latest/meta-data/reservation-id", "")
    );
    h.write(&mut c, both.as_bytes());
    let first = h.read_response(&mut c);
    assert_eq!(first.body, "ami-12345678");
    let second = h.read_response(&mut c);
    assert_eq!(second.body, "r-fea54097");
}

#[test]
fn checksums_are_checked() {
    let mut h = Harness::new("V1");
    let syn = Out {
        src_port: 40018,
        dst_port: 80,
        seq: 1,
        ack: 0,
        flags: SYN,
        window: 1000,
        options: &[],
        payload: &[],
    };
    // Bad IPv4 header checksum: ours (consumed) but dropped.
    let mut frame = tcp_frame(DEFAULT_IPV4, &syn);
    frame[14 + 10] ^= 0xff;
    assert!(h.send(&frame));
    assert!(h.drain().is_empty());
    // Bad TCP checksum: same.
    let mut frame = tcp_frame(DEFAULT_IPV4, &syn);
    frame[14 + 20 + 16] ^= 0x5a;
    assert!(h.send(&frame));
    assert!(h.drain().is_empty());
    assert_eq!(h.stack.connection_count(), 0);
    // Checksum left to the device (virtio-net offload): only the pseudo-header sum is there.
    let mut frame = tcp_frame(DEFAULT_IPV4, &syn);
    let tcp_len = frame.len() - 34;
    let mut partial = pseudo(GUEST_IP, DEFAULT_IPV4, tcp_len);
    while partial > 0xffff {
        partial = (partial & 0xffff) + (partial >> 16);
    }
    frame[34 + 16..34 + 18].copy_from_slice(&(partial as u16).to_be_bytes());
    assert!(h.send(&frame));
    assert_eq!(h.drain()[0].flags, SYN | ACK);
}

#[test]
fn malformed_frames_never_panic() {
    let mut h = Harness::new("V2");
    let mut c = h.connect(40019);
    h.write(&mut c, b"GET / HTTP/1.1\r\n");
    // xorshift: deterministic noise.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let valid = tcp_frame(
        DEFAULT_IPV4,
        &Out {
            src_port: 40019,
            dst_port: 80,
            seq: c.seq,
            ack: c.ack,
            flags: ACK,
            window: 100,
            options: &[1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0],
            payload: b"Host: x\r\n\r\n",
        },
    );
    let arp = arp_request(DEFAULT_IPV4, 1);
    for round in 0..20_000 {
        let frame: Vec<u8> = match round % 4 {
            // Pure noise.
            0 => (0..(next() % 200) as usize).map(|_| next() as u8).collect(),
            // A valid frame, truncated anywhere.
            1 => valid[..(next() as usize) % (valid.len() + 1)].to_vec(),
            // A valid frame with a few random bytes flipped (header fields included).
            2 => {
                let mut f = valid.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % f.len();
                    f[at] = next() as u8;
                }
                f
            }
            // Corrupted ARP.
            _ => {
                let mut f = arp.clone();
                let at = (next() as usize) % f.len();
                f[at] = next() as u8;
                f[..(next() as usize) % (f.len() + 1)].to_vec()
            }
        };
        h.send(&frame);
        if round % 64 == 0 {
            h.now += Duration::from_millis(50);
            h.stack.on_timer(h.now);
        }
        while h.stack.next_frame_at(h.now).is_some() {}
    }
    assert!(h.stack.connection_count() <= StackLimits::default().max_connections);
}

#[test]
fn bad_http_gets_400_and_close() {
    let mut h = Harness::new("V1");
    let mut c = h.connect(40020);
    h.write(&mut c, b"BREW /pot HTCPCP/1.0\r\n\r\n");
    let out = h.drain();
    let data: Vec<u8> = out.iter().flat_map(|s| s.payload.clone()).collect();
    let r = complete(&data).expect("response");
    assert_eq!(r.status, 400);
    assert!(out.iter().any(|s| s.flags & FIN != 0));
}
