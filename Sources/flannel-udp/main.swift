import FlannelUDP
print("flannel-udp")
