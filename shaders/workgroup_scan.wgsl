// An inclusive prefix sum over a workgroup's WG threads (the includer's injected WG), one value
// per thread, through workgroup memory: Hillis-Steele, log2(WG) steps with two barriers each.
// Call it in uniform control flow; a second call overwrites scan_buf, so callers that read
// scan_buf after a scan put a barrier before the next one. Used by the top-k selects that work
// in 256-thread workgroups (topk.wgsl, topk_multi.wgsl).

var<workgroup> scan_buf: array<u32, WG>;

fn scan_inclusive(tid: u32, value: u32) -> u32 {
    scan_buf[tid] = value;
    workgroupBarrier();
    for (var offset = 1u; offset < WG; offset *= 2u) {
        var x = scan_buf[tid];
        if (tid >= offset) {
            x += scan_buf[tid - offset];
        }
        workgroupBarrier();
        scan_buf[tid] = x;
        workgroupBarrier();
    }
    return scan_buf[tid];
}
