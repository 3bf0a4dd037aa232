/*
 * synflood: a bounded, paced TCP SYN sender for nfknock's benchmarks.
 *
 * Sends hand-built Ethernet/IPv4 or IPv6/TCP SYN frames from an AF_PACKET socket
 * with sendmmsg(), to one destination inside the benchmark's own network
 * namespaces.  Source addresses are spoofed only from the documentation ranges
 * (192.0.2.0/24, 198.51.100.128/25, 203.0.113.0/24, 2001:db8::1:0:0 and up inside
 * 2001:db8::/64; the lab's own
 * hosts live in 198.51.100.0/25 and are never spoofed).  Always bounded:
 * it stops after -n packets or -t seconds, whichever comes first.
 *
 *   synflood -i IFACE -m DSTMAC -d DST [-p LO-HI] [-r PPS] [-n COUNT] [-t SECONDS]
 *            [-s fixed:ADDR | -s doc4 | -s seq6]
 *
 * Prints one JSON line: {"sent": N, "seconds": S, "pps": R}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXFRAME 128

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_rand(void) {  /* xorshift64* */
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return (uint32_t)((rng * 2685821657736338717ull) >> 32);
}

static uint32_t sum16(const void *data, size_t len, uint32_t acc) {
    const uint8_t *p = data;
    for (size_t i = 0; i + 1 < len; i += 2) acc += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1) acc += (uint32_t)(p[len - 1] << 8);
    return acc;
}

static uint16_t fold(uint32_t acc) {
    while (acc >> 16) acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint16_t)~acc;
}

static int parse_mac(const char *s, uint8_t mac[6]) {
    return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3],
                  &mac[4], &mac[5]) == 6 ? 0 : -1;
}

static void usage(void) {
    fprintf(stderr, "usage: synflood -i IFACE -m DSTMAC -d DST [-p LO-HI] [-r PPS] "
                    "[-n COUNT] [-t SECONDS] [-s fixed:ADDR|doc4|seq6]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *ifname = NULL, *dstmac = NULL, *dst = NULL, *srcmode = "doc4";
    int lo = 1024, hi = 33791;
    double pps = 0, seconds = 10;
    long long count = 1000000;
    int opt;
    while ((opt = getopt(argc, argv, "i:m:d:p:r:n:t:s:")) != -1) {
        switch (opt) {
        case 'i': ifname = optarg; break;
        case 'm': dstmac = optarg; break;
        case 'd': dst = optarg; break;
        case 'p': if (sscanf(optarg, "%d-%d", &lo, &hi) != 2) usage(); break;
        case 'r': pps = atof(optarg); break;
        case 'n': count = atoll(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 's': srcmode = optarg; break;
        default: usage();
        }
    }
    if (!ifname || !dstmac || !dst || lo < 1 || hi > 65535 || lo > hi) usage();
    if (seconds <= 0 || seconds > 600 || count <= 0) {
        fprintf(stderr, "synflood: -t must be in (0, 600] and -n positive\n");
        return 2;
    }
    uint8_t dmac[6];
    if (parse_mac(dstmac, dmac)) usage();
    struct in6_addr d6, fixed6;
    struct in_addr d4, fixed4;
    int v6 = strchr(dst, ':') != NULL;
    if (v6 ? inet_pton(AF_INET6, dst, &d6) != 1 : inet_pton(AF_INET, dst, &d4) != 1) usage();
    int fixed = strncmp(srcmode, "fixed:", 6) == 0;
    if (fixed && (v6 ? inet_pton(AF_INET6, srcmode + 6, &fixed6) != 1
                     : inet_pton(AF_INET, srcmode + 6, &fixed4) != 1)) usage();
    if (!fixed && strcmp(srcmode, v6 ? "seq6" : "doc4") != 0) {
        fprintf(stderr, "synflood: -s must be fixed:ADDR, doc4 (IPv4) or seq6 (IPv6)\n");
        return 2;
    }

    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) { perror("socket(AF_PACKET)"); return 1; }
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) { perror("SIOCGIFINDEX"); return 1; }
    int ifindex = ifr.ifr_ifindex;
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) { perror("SIOCGIFHWADDR"); return 1; }
    struct sockaddr_ll sll = {0};
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    memcpy(sll.sll_addr, dmac, 6);

    static uint8_t frames[BATCH][MAXFRAME];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    size_t iphl = v6 ? 40 : 20, len = 14 + iphl + 20;
    for (int b = 0; b < BATCH; b++) {
        uint8_t *f = frames[b];
        memset(f, 0, MAXFRAME);
        memcpy(f, dmac, 6);
        memcpy(f + 6, ifr.ifr_hwaddr.sa_data, 6);
        f[12] = v6 ? 0x86 : 0x08; f[13] = v6 ? 0xDD : 0x00;
        uint8_t *ip = f + 14;
        if (v6) {
            ip[0] = 0x60; ip[4] = 0; ip[5] = 20; ip[6] = IPPROTO_TCP; ip[7] = 64;
            memcpy(ip + 24, &d6, 16);
        } else {
            ip[0] = 0x45; ip[3] = 40; ip[8] = 64; ip[9] = IPPROTO_TCP;
            memcpy(ip + 16, &d4, 4);
        }
        uint8_t *tcp = ip + iphl;
        tcp[12] = 5 << 4; tcp[13] = 0x02; tcp[14] = 0xFA; tcp[15] = 0xF0;
        iov[b].iov_base = f; iov[b].iov_len = len;
        memset(&msgs[b], 0, sizeof msgs[b]);
        msgs[b].msg_hdr.msg_name = &sll;
        msgs[b].msg_hdr.msg_namelen = sizeof sll;
        msgs[b].msg_hdr.msg_iov = &iov[b];
        msgs[b].msg_hdr.msg_iovlen = 1;
    }
    static const uint8_t doc4[3][3] = {{192, 0, 2}, {198, 51, 100}, {203, 0, 113}};
    long long sent = 0, seq = 0;
    double start = now(), deadline = start + seconds;
    while (sent < count) {
        double t = now();
        if (t >= deadline) break;
        if (pps > 0) {
            double due = start + sent / pps;
            if (due > t) {
                if (due - t > 0.0002) {
                    struct timespec ts = {0, (long)((due - t) * 1e9)};
                    nanosleep(&ts, NULL);
                }
                continue;
            }
        }
        int n = BATCH;
        if (count - sent < n) n = (int)(count - sent);
        for (int b = 0; b < n; b++, seq++) {
            uint8_t *ip = frames[b] + 14, *tcp = ip + iphl;
            uint16_t dport = (uint16_t)(lo + next_rand() % (uint32_t)(hi - lo + 1));
            uint16_t sport = (uint16_t)(1024 + next_rand() % 60000);
            uint32_t isn = next_rand();
            tcp[0] = sport >> 8; tcp[1] = sport & 0xFF;
            tcp[2] = dport >> 8; tcp[3] = dport & 0xFF;
            memcpy(tcp + 4, &isn, 4);
            tcp[16] = tcp[17] = 0;
            uint32_t acc;
            if (v6) {
                if (fixed) memcpy(ip + 8, &fixed6, 16);
                else {  /* 2001:db8::/64 from ::1:0:0 up (never the lab's own ::1, ::10),
                           sequential: every packet a new source */
                    memset(ip + 8, 0, 16);
                    ip[8] = 0x20; ip[9] = 0x01; ip[10] = 0x0d; ip[11] = 0xb8;
                    uint64_t s = (uint64_t)seq + 0x100000000ULL;
                    for (int k = 0; k < 8; k++) ip[23 - k] = (uint8_t)(s >> (8 * k));
                }
                uint8_t pseudo[40] = {0};
                memcpy(pseudo, ip + 8, 32);
                pseudo[35] = 20; pseudo[39] = IPPROTO_TCP;
                acc = sum16(pseudo, 40, 0);
            } else {
                if (fixed) memcpy(ip + 12, &fixed4, 4);
                else {
                    const uint8_t *net = doc4[next_rand() % 3];
                    ip[12] = net[0]; ip[13] = net[1]; ip[14] = net[2];
                    ip[15] = (uint8_t)(1 + next_rand() % 254);
                    if (net[2] == 100) ip[15] = (uint8_t)(128 + next_rand() % 127);
                }
                ip[4] = (uint8_t)(seq >> 8); ip[5] = (uint8_t)seq;
                ip[10] = ip[11] = 0;
                uint16_t c = fold(sum16(ip, 20, 0));
                ip[10] = c >> 8; ip[11] = c & 0xFF;
                uint8_t pseudo[12];
                memcpy(pseudo, ip + 12, 8);
                pseudo[8] = 0; pseudo[9] = IPPROTO_TCP; pseudo[10] = 0; pseudo[11] = 20;
                acc = sum16(pseudo, 12, 0);
            }
            uint16_t c = fold(sum16(tcp, 20, acc));
            tcp[16] = c >> 8; tcp[17] = c & 0xFF;
        }
        int r = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (r < 0) {
            if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) continue;
            perror("sendmmsg");
            return 1;
        }
        sent += r;
    }
    double took = now() - start;
    printf("{\"sent\": %lld, \"seconds\": %.4f, \"pps\": %.0f}\n", sent, took,
           took > 0 ? sent / took : 0.0);
    return 0;
}
