//! A tiny DNS server for the discovery tests.

use super::*;

/// A tiny DNS server on a loopback UDP port that answers A queries for one name with
/// the addresses the test sets (AAAA and other names: no records). `fail` makes it
/// answer SERVFAIL, as a broken resolver would.
pub struct TestDns {
    pub addr: SocketAddr,
    state: Arc<Mutex<(Vec<std::net::Ipv4Addr>, bool)>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    pub async fn start(name: &str, ips: &[std::net::Ipv4Addr]) -> TestDns {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("udp bind");
        let addr = sock.local_addr().expect("addr");
        let state = Arc::new(Mutex::new((ips.to_vec(), false)));
        let st = state.clone();
        let want: Vec<u8> = encode_name(name);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let (ips, fail) = st.lock().map(|s| s.clone()).unwrap_or_default();
                if let Some(resp) = dns_answer(&buf[..n], &want, &ips, fail) {
                    let _ = sock.send_to(&resp, peer).await;
                }
            }
        });
        TestDns { addr, state, task }
    }

    pub fn set(&self, ips: &[std::net::Ipv4Addr]) {
        if let Ok(mut s) = self.state.lock() {
            *s = (ips.to_vec(), false);
        }
    }

    pub fn fail(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend(label.to_ascii_lowercase().as_bytes());
    }
    out.push(0);
    out
}

/// Answers one DNS query (RFC 1035 wire format).
fn dns_answer(q: &[u8], want: &[u8], ips: &[std::net::Ipv4Addr], fail: bool) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // The question: name, then type and class.
    let mut i = 12;
    while i < q.len() && q[i] != 0 {
        i += 1 + q[i] as usize;
    }
    let name_end = i + 1;
    if name_end + 4 > q.len() {
        return None;
    }
    let qname: Vec<u8> = q[12..name_end].to_ascii_lowercase();
    let qtype = u16::from_be_bytes([q[name_end], q[name_end + 1]]);
    let question = &q[12..name_end + 4];
    let answers: &[std::net::Ipv4Addr] = if qname == want && qtype == 1 {
        ips
    } else {
        &[]
    };
    let rcode: u8 = if fail { 2 } else { 0 };
    let mut r = Vec::with_capacity(64);
    r.extend(&q[0..2]); // id
    r.push(0x81 | (q[2] & 0x01)); // QR, RD copied
    r.push(0x80 | rcode); // RA, rcode
    r.extend(1u16.to_be_bytes());
    r.extend((if fail { 0 } else { answers.len() as u16 }).to_be_bytes());
    r.extend(0u16.to_be_bytes());
    r.extend(0u16.to_be_bytes());
    r.extend(question);
    if !fail {
        for ip in answers {
            r.extend([0xc0, 0x0c]); // pointer to the question's name
            r.extend(1u16.to_be_bytes()); // A
            r.extend(1u16.to_be_bytes()); // IN
            r.extend(0u32.to_be_bytes()); // TTL 0
            r.extend(4u16.to_be_bytes());
            r.extend(ip.octets());
        }
    }
    Some(r)
}
