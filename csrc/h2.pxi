# H2Connection over libnghttp2.
