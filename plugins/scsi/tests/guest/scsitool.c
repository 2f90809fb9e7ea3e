/* A guest-side test peer for the scsi class's real-guest test (compiled static by the test).
 *   scsitool eject DEV            CDROMEJECT on DEV (opened O_NONBLOCK); prints "eject=RC"
 *   scsitool sgio DEV CDBHEX LEN  one SG_IO with a raw CDB reading LEN bytes; prints
 *                                 "status=S sense=K/ASC/ASCQ data=HEX"
 * busybox has neither eject nor sg_raw, so the test brings this. */
#include <fcntl.h>
#include <linux/cdrom.h>
#include <scsi/sg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "eject") == 0) {
        int fd = open(argv[2], O_RDONLY | O_NONBLOCK);
        if (fd < 0) { perror("open"); return 2; }
        int rc = ioctl(fd, CDROMEJECT, 0);
        printf("eject=%d\n", rc);
        return rc == 0 ? 0 : 1;
    }
    if (argc >= 5 && strcmp(argv[1], "sgio") == 0) {
        unsigned char cdb[16], sense[64], data[4096];
        size_t cdb_len = strlen(argv[3]) / 2;
        int len = atoi(argv[4]);
        if (cdb_len < 6 || cdb_len > sizeof cdb || len < 0 || len > (int)sizeof data) return 2;
        for (size_t i = 0; i < cdb_len; i++) sscanf(argv[3] + 2 * i, "%2hhx", &cdb[i]);
        int fd = open(argv[2], O_RDWR | O_NONBLOCK);
        if (fd < 0) { perror("open"); return 2; }
        sg_io_hdr_t io;
        memset(&io, 0, sizeof io);
        memset(sense, 0, sizeof sense);
        io.interface_id = 'S';
        io.dxfer_direction = len ? SG_DXFER_FROM_DEV : SG_DXFER_NONE;
        io.cmd_len = cdb_len;
        io.cmdp = cdb;
        io.dxfer_len = len;
        io.dxferp = data;
        io.mx_sb_len = sizeof sense;
        io.sbp = sense;
        io.timeout = 20000;
        if (ioctl(fd, SG_IO, &io) < 0) { perror("SG_IO"); return 2; }
        printf("status=%d sense=%x/%02x/%02x data=", io.status, sense[2] & 15, sense[12], sense[13]);
        for (int i = 0; i < len - io.resid; i++) printf("%02x", data[i]);
        printf("\n");
        return 0;
    }
    fprintf(stderr, "usage: scsitool eject DEV | sgio DEV CDBHEX LEN\n");
    return 2;
}
