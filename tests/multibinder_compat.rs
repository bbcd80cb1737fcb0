//! The reference client's exact wire form against the real broker.

mod common;

use std::os::fd::AsFd;

use common::*;

#[test]
fn reference_client_gets_the_same_socket_twice() {
    let broker = Broker::start("mbsame");
    let port = free_port();
    let (reply, fds) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port));
    let v = json(&reply);
    assert_eq!(v["result"], true, "{reply}");
    assert_eq!(v["id"], "c0ffee00-0000-4000-8000-000000000001");
    assert_eq!(fds.len(), 1);
    let (reply2, fds2) = reference_request(&broker.control, &multibinder_bind_request("127.0.0.1", port));
    assert_eq!(json(&reply2)["result"], true);
    assert_eq!(inode(fds[0].as_fd()), inode(fds2[0].as_fd()), "second bind must get the same kernel socket");
    assert!(is_cloexec(fds[0].as_fd()));
}
