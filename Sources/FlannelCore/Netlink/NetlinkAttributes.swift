import CNetlink

/// The attributes of one netlink message (or of one nested attribute), indexed by type, each checked against the
/// bytes that contain it before it is stored.
///
/// The walk uses libmnl's `mnl_attr_ok` / `mnl_attr_next` (the functions behind the `mnl_attr_for_each` macro,
/// which Swift cannot import). Unlike that macro, which stops quietly at the first attribute that does not fit,
/// `init?` fails when bytes are left over that do not form a whole attribute: a truncated or corrupt message is
/// reported instead of being half-read. Every typed accessor validates the payload length (`mnl_attr_validate`)
/// and returns nil when it is wrong, so reading never goes past an attribute's end.
///
/// The pointers refer into the caller's buffer: use a value only while that buffer is alive (within the parse).
package struct NetlinkAttributes {
    private var table: [UInt16: UnsafePointer<nlattr>] = [:]

    /// Walks the attributes in `region`. Fails when the region does not consist of whole attributes.
    package init?(_ region: UnsafeRawBufferPointer) {
        guard let base = region.baseAddress, region.count > 0 else { return }
        var attr = base.assumingMemoryBound(to: nlattr.self)
        var remaining = region.count
        while remaining > 0 {
            // mnl_attr_ok: room for the header, nla_len >= header, nla_len <= remaining.
            guard remaining <= Int(Int32.max), mnl_attr_ok(attr, Int32(remaining)) else { return nil }
            table[mnl_attr_get_type(attr)] = attr
            guard let next = mnl_attr_next(attr) else { return nil }
            // The last attribute's padding may lie beyond the region (an unpadded end); the loop then stops.
            remaining -= UnsafeRawPointer(next) - UnsafeRawPointer(attr)
            attr = UnsafePointer(next)
        }
    }

    /// Whether an attribute of this type is present (whatever its length).
    package func has(_ type: UInt16) -> Bool { table[type] != nil }

    private func validated(_ type: UInt16, _ dataType: mnl_attr_data_type) -> UnsafePointer<nlattr>? {
        guard let attr = table[type], mnl_attr_validate(attr, dataType) == 0 else { return nil }
        return attr
    }

    /// A u8 attribute (payload exactly 1 byte), or nil when absent or of another length.
    package func u8(_ type: UInt16) -> UInt8? { validated(type, MNL_TYPE_U8).map { mnl_attr_get_u8($0) } }

    /// A u32 attribute in host byte order (payload exactly 4 bytes).
    package func u32(_ type: UInt16) -> UInt32? { validated(type, MNL_TYPE_U32).map { mnl_attr_get_u32($0) } }

    /// A 4-byte IPv4 address in network byte order (RTA_DST, RTA_GATEWAY, IFA_LOCAL, ...).
    package func ipv4(_ type: UInt16) -> IPv4Address? {
        validated(type, MNL_TYPE_U32).map { IPv4Address(networkOrder: mnl_attr_get_u32($0)) }
    }

    /// A NUL-terminated string attribute (IFLA_IFNAME, IFLA_INFO_KIND, NLMSGERR_ATTR_MSG). Nil when the payload
    /// is empty or its last byte is not NUL, so the read always stops inside the attribute.
    package func string(_ type: UInt16) -> String? {
        guard let attr = validated(type, MNL_TYPE_NUL_STRING), let cstr = mnl_attr_get_str(attr) else { return nil }
        return String(cString: cstr)
    }

    /// The raw payload of an attribute (for RTA_MULTIPATH, whose payload is not a list of attributes).
    package func payload(_ type: UInt16) -> UnsafeRawBufferPointer? {
        guard let attr = table[type], let data = mnl_attr_get_payload(attr) else { return nil }
        return UnsafeRawBufferPointer(start: data, count: Int(mnl_attr_get_payload_len(attr)))
    }

    /// The attributes nested inside an attribute (IFLA_LINKINFO). Nil when absent or malformed.
    package func nested(_ type: UInt16) -> NetlinkAttributes? {
        guard validated(type, MNL_TYPE_NESTED) != nil, let region = payload(type) else { return nil }
        return NetlinkAttributes(region)
    }
}

/// Rounds up to netlink's 4-byte alignment (NLMSG_ALIGN / NLA_ALIGN).
@inline(__always)
package func netlinkAlign(_ length: Int) -> Int { (length + 3) & ~3 }
