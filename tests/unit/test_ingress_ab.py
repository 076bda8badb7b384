import socket

import psutil
import pytest

from bench.ingress_ab import DIRECT_PORTS, direct_port


def test_the_direct_ingress_port_is_the_one_a_cluster_process_listens_on_in_rays_range():
    me = psutil.Process()
    with pytest.raises(RuntimeError, match="no process of the cluster listens"):
        direct_port([me])
    for port in DIRECT_PORTS:  # the first free one in Ray's range
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
            break
        except OSError:
            s.close()
    with s:
        s.listen()
        assert direct_port([me]) == port
