//! Keys to node paths.
//!
//! A key becomes ONE path component under the root: every character ZooKeeper refuses in a
//! node name, plus `/` and `%`, is written as `%XX` for each of its UTF-8 bytes, and a key
//! that is exactly `.` or `..` has its dots escaped. ZooKeeper (Java) refuses control
//! characters, U+007F–U+009F, U+D800–U+F8FF (Rust strings hold no surrogates, so U+E000–U+F8FF here), U+FFF0–U+FFFF and, because it checks UTF-16
//! units, every character above U+FFFF; all of those are escaped. The mapping is
//! injective, so two keys never share a node; every key `lock-core` accepts has a path.

/// Whether ZooKeeper refuses `c` in a path.
pub(crate) fn illegal_in_zk(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{e000}'..='\u{f8ff}' | '\u{fff0}'..)
}

/// The node name of `key`.
pub fn escape_key(key: &str) -> String {
    if key == "." || key == ".." {
        return key.replace('.', "%2E");
    }
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if c == '/' || c == '%' || illegal_in_zk(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lock nodes are named `_c_<lease id>-lock-<sequence>` ("protected" naming, as in
/// Curator): after a connection loss during create, a client finds its own node by the
/// lease id instead of creating a second one.
pub(crate) fn node_prefix(lease: &str) -> String {
    format!("_c_{lease}-lock-")
}

/// The sequence number ZooKeeper appended to a lock node's name.
pub(crate) fn sequence_of(name: &str) -> Option<u64> {
    let (_, seq) = name.rsplit_once("-lock-")?;
    seq.parse().ok()
}

/// The lease id in a lock node's name.
pub(crate) fn lease_of(name: &str) -> Option<&str> {
    name.strip_prefix("_c_")?
        .split_once("-lock-")
        .map(|(l, _)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_to_one_legal_component() {
        assert_eq!(escape_key("inventory:item-1"), "inventory:item-1");
        assert_eq!(escape_key("a/b"), "a%2Fb");
        assert_eq!(escape_key("100%"), "100%25");
        assert_eq!(escape_key("."), "%2E");
        assert_eq!(escape_key(".."), "%2E%2E");
        assert_eq!(escape_key("..."), "...");
        assert_eq!(escape_key("é"), "é");
        assert_eq!(escape_key("😀"), "%F0%9F%98%80");
        assert_eq!(escape_key("\u{e000}"), "%EE%80%80");
        // Injective: the escape character itself is escaped.
        assert_ne!(escape_key("a/b"), escape_key("a%2Fb"));
        for k in ["a/b", "%", "😀x", "\u{fff5}"] {
            assert!(!escape_key(k).contains('/'));
            assert!(!escape_key(k).chars().any(illegal_in_zk));
        }
    }

    #[test]
    fn node_names_parse() {
        let name = format!("{}0000000042", node_prefix("abc"));
        assert_eq!(sequence_of(&name), Some(42));
        assert_eq!(lease_of(&name), Some("abc"));
        assert_eq!(sequence_of("garbage"), None);
        assert_eq!(lease_of("x-lock-1"), None);
    }
}
