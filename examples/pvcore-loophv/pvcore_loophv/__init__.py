"""pvcore-loophv, the worked example of docs/porting.md: the hooks (:mod:`.plugin`), the transport
(:mod:`.transport`) and the guest side that the conformance kit drives (:mod:`.testing`)."""
