/* The lowest floor for bench/latency_floors.py: a TCP <-> UDP relay in C, one
 * process per node, one blocking epoll loop, no protocol at all. What a unary call
 * gains through two of these is what the kernel and this machine charge for two
 * extra processes on the path, before any Python runs.
 *
 *   floor_relay forward UDP_PORT   accept one TCP client, relay it to 127.0.0.1:UDP_PORT
 *   floor_relay reverse TCP_PORT   wait for the first datagram, connect to 127.0.0.1:TCP_PORT
 *
 * Prints one JSON line with the port it listens on, like the Python nodes.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return address;
}

static int bound_port(int fd) {
    struct sockaddr_in address;
    socklen_t length = sizeof address;
    if (getsockname(fd, (struct sockaddr *)&address, &length) < 0) return -1;
    return ntohs(address.sin_port);
}

static void fail(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    static char buffer[65536];
    if (argc != 3) {
        fprintf(stderr, "usage: %s forward|reverse PORT\n", argv[0]);
        return 2;
    }
    int reverse = strcmp(argv[1], "reverse") == 0;
    int port = atoi(argv[2]);
    int one = 1;
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in any = loopback(0), peer;
    if (udp < 0 || bind(udp, (struct sockaddr *)&any, sizeof any) < 0) fail("udp");
    int tcp;
    if (reverse) {
        printf("{\"udp_port\": %d}\n", bound_port(udp));
        fflush(stdout);
        socklen_t length = sizeof peer;
        ssize_t first = recvfrom(udp, buffer, sizeof buffer, 0, (struct sockaddr *)&peer, &length);
        struct sockaddr_in server = loopback(port);
        tcp = socket(AF_INET, SOCK_STREAM, 0);
        if (first < 0 || tcp < 0 || connect(tcp, (struct sockaddr *)&server, sizeof server) < 0) fail("connect");
        setsockopt(tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (write(tcp, buffer, first) != first) fail("write");
    } else {
        peer = loopback(port);
        int listener = socket(AF_INET, SOCK_STREAM, 0);
        if (listener < 0 || bind(listener, (struct sockaddr *)&any, sizeof any) < 0 || listen(listener, 1) < 0) fail("listen");
        printf("{\"tcp_port\": %d}\n", bound_port(listener));
        fflush(stdout);
        tcp = accept(listener, NULL, NULL);
        if (tcp < 0) fail("accept");
        close(listener);
        setsockopt(tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int poller = epoll_create1(0);
    struct epoll_event interest = {.events = EPOLLIN};
    interest.data.fd = tcp;
    epoll_ctl(poller, EPOLL_CTL_ADD, tcp, &interest);
    interest.data.fd = udp;
    epoll_ctl(poller, EPOLL_CTL_ADD, udp, &interest);
    for (;;) {
        struct epoll_event ready[2];
        int count = epoll_wait(poller, ready, 2, -1);
        for (int i = 0; i < count; i++) {
            if (ready[i].data.fd == tcp) {
                ssize_t got = read(tcp, buffer, sizeof buffer);
                if (got <= 0) return 0;
                sendto(udp, buffer, got, 0, (struct sockaddr *)&peer, sizeof peer);
            } else {
                ssize_t got = recv(udp, buffer, sizeof buffer, 0);
                /* small messages: a loopback TCP socket never fills in this benchmark */
                if (got > 0 && write(tcp, buffer, got) != got) return 1;
            }
        }
    }
}
