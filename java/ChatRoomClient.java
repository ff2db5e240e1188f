import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.Console;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.net.UnknownHostException;
import java.nio.ByteBuffer;
import java.nio.charset.CharsetDecoder;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.time.LocalTime;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.regex.Pattern;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLException;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManager;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509TrustManager;

/**
 * The chat room client in Java: the same flags, lines, exit statuses and threads as
 * chatroom_client.py. Java 11 or newer, standard library only; run it as
 * {@code java java/ChatRoomClient.java --host HOST --port PORT}.
 *
 * <p>The receiver thread is the only reader of the socket and the only writer to stdout; the
 * input thread is the only reader of stdin. The main thread waits for either to end the
 * session and prints the one closing line on stderr. Ctrl-C, SIGTERM and SIGHUP leave the room
 * the way !Quit does (a shutdown hook). On a terminal, each line received starts a row of its
 * own and is wrapped to the terminal's width with every later row indented; piped, lines are
 * printed as received.
 */
public final class ChatRoomClient {
    static final String PROG = "chatroom-client";
    static final String VERSION = "0.3.0"; // held to chatroom/__init__.py by a test
    static final String JOIN = "!Join";
    static final String QUIT = "!Quit";
    // A name the room accepts (protocol.NAME_PATTERN): 1 to 16 ASCII letters, digits, _ or -,
    // a letter first.
    static final Pattern NAME = Pattern.compile("[A-Za-z][A-Za-z0-9_-]{0,15}");
    // What --timestamps puts before every line shown: the local time.
    static final DateTimeFormatter TIMESTAMP = DateTimeFormatter.ofPattern("HH:mm ");
    static final String DEFAULT_HOST = "127.0.0.1";
    static final int DEFAULT_PORT = 5050;
    // How long a leaving client waits for the server's goodbye and close: exit within 2 s.
    static final long LEAVE_TIMEOUT_MS = 1500;
    // An unreachable host should fail in seconds, not after the OS's minutes of retries.
    static final int CONNECT_TIMEOUT_MS = 5000;
    // Longest line accepted from a server: bounds what a hostile server can make us hold.
    static final int MAX_SERVER_LINE = 65536;
    // The twelve bidirectional controls (Trojan Source): never printed raw.
    static final String BIDI_CONTROLS =
            "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069";

    // Every row a received line wraps onto starts with this, so no row but a line's first
    // starts where a line does: padding to the width cannot fake a notice or someone's line.
    static final String CONTINUATION_INDENT = "  ";
    // The width of a terminal that tells none: the VT100's.
    static final int DEFAULT_COLUMNS = 80;
    // The width is read again at most this often, so a resized terminal is followed.
    static final long COLUMNS_MAX_AGE_NS = TimeUnit.SECONDS.toNanos(1);
    // Characters a terminal gives two columns: first and last code point of each run, covering
    // every East Asian Wide and Fullwidth character of Unicode 14. Runs are merged over unassigned
    // code points and symbols: a narrow character counted as two only ends a row early, but a
    // wide one counted as one would let the terminal wrap the row itself, unindented.
    static final int[] WIDE = {
        0x1100, 0x115F, 0x231A, 0x23F3, 0x25FD, 0x27BF, 0x2B1B, 0x2B55, 0x2E80, 0xA4CF,
        0xA960, 0xA97F, 0xAC00, 0xD7A3, 0xF900, 0xFAFF, 0xFE10, 0xFE6F, 0xFF00, 0xFF60,
        0xFFE0, 0xFFE6, 0x16FE0, 0x18DFF, 0x1AFF0, 0x1B2FF, 0x1F004, 0x1FAFF, 0x20000, 0x3FFFD,
    };

    private final Socket socket;
    private final OutputStream out;
    private final String name; // taken with /nick right after !Join; null for none
    private final boolean timestamps; // every line shown starts with the local time, "HH:MM "
    private final PrintStream stdout =
            new PrintStream(System.out, true, StandardCharsets.UTF_8);
    // Someone types on this terminal while lines arrive, so each line starts a row of its own.
    private final boolean onTerminal = isTerminal();
    private final CountDownLatch changed = new CountDownLatch(1); // leaving or ended
    private final CountDownLatch ended = new CountDownLatch(1); // the stream ended
    private final CountDownLatch finished = new CountDownLatch(1); // run() is done: exitStatus set
    private volatile int exitStatus; // the session's exit status, once finished is open
    private int columns; // the terminal's width as last read (receiver thread only)
    private long columnsReadAt; // System.nanoTime() when it was read
    private volatile boolean leaving; // the user asked to leave and !Quit went out
    private volatile String failure; // why the session ended, if the user did not end it

    private ChatRoomClient(Socket socket, String name, boolean timestamps) throws IOException {
        this.socket = socket;
        this.out = socket.getOutputStream();
        this.name = name;
        this.timestamps = timestamps;
    }

    public static void main(String[] args) {
        String host = DEFAULT_HOST;
        int port = DEFAULT_PORT;
        String name = null;
        boolean timestamps = false;
        Tls tls = null; // plain text unless a --tls flag is given
        String password = null;
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            if (arg.equals("--help") || arg.equals("-h")) {
                System.out.println("usage: " + PROG
                        + " [-h] [--version] [--host HOST] [--port PORT] [--name NAME]"
                        + " [--timestamps] [--tls] [--tls-ca FILE] [--tls-fingerprint SHA256]"
                        + " [--password-file FILE]");
                System.out.println();
                System.out.println("Join a chat room. Type to talk; !Quit to leave.");
                System.out.println();
                System.out.println("  --host HOST   server address (default: " + DEFAULT_HOST + ")");
                System.out.println("  --port PORT   server port (default: " + DEFAULT_PORT + ")");
                System.out.println("  --name NAME   take this name once in the room (/nick changes"
                        + " it); others see NAME@IP:PORT");
                System.out.println("  --timestamps  start every line shown with the local time"
                        + " (HH:MM)");
                System.out.println("  --version     show the version and exit");
                System.out.println("  --tls         connect with TLS, verified against the system's CAs");
                System.out.println("  --tls-ca FILE  connect with TLS, verified against this CA (PEM)");
                System.out.println("  --tls-fingerprint SHA256  connect with TLS to the server whose"
                        + " certificate has this SHA-256 fingerprint, whoever signed it");
                System.out.println("  --password-file FILE  the room's password, on the file's first line");
                return;
            } else if (arg.equals("--version")) {
                System.out.println(PROG + " " + VERSION + " (Java)");
                return;
            } else if (arg.equals("--tls")) {
                tls = tls == null ? new Tls(null, null) : tls;
            } else if (TAKES_VALUE.contains(arg) && i + 1 == args.length) {
                usageError("argument " + arg + ": expected one argument");
            } else if (arg.equals("--host")) {
                host = args[++i];
            } else if (arg.equals("--port")) {
                port = parsePort(args[++i]);
            } else if (arg.equals("--name")) {
                name = parseName(args[++i]);
            } else if (arg.equals("--timestamps")) {
                timestamps = true;
            } else if (arg.equals("--tls-ca")) {
                tls = new Tls(args[++i], tls == null ? null : tls.fingerprint);
            } else if (arg.equals("--tls-fingerprint")) {
                tls = new Tls(tls == null ? null : tls.caFile, parseFingerprint(args[++i]));
            } else if (arg.equals("--password-file")) {
                password = readPassword(args[++i]);
            } else {
                usageError("unrecognized arguments: " + arg);
            }
        }
        System.exit(connectAndChat(host, port, name, timestamps, tls, password));
    }

    static String parseName(String text) {
        if (!NAME.matcher(text).matches()) {
            usageError("argument --name: '" + text + "' is not a name: 1 to 16 ASCII letters,"
                    + " digits, _ or -, a letter first");
        }
        return text;
    }
    static final List<String> TAKES_VALUE =
            List.of("--host", "--port", "--name", "--tls-ca", "--tls-fingerprint", "--password-file");

    /** How to check the server over TLS: a CA file (else the system's), or a pinned leaf. */
    static final class Tls {
        final String caFile; // PEM; null: the JDK's trusted CAs
        final byte[] fingerprint; // the leaf's SHA-256; null: no pin, the CA decides

        Tls(String caFile, byte[] fingerprint) {
            this.caFile = caFile;
            this.fingerprint = fingerprint;
        }
    }

    /** A SHA-256 fingerprint as typed (colons, spaces and case optional), as 32 bytes. */
    static byte[] parseFingerprint(String text) {
        String digits = text.strip().replace(":", "").replace(" ", "");
        if (!digits.matches("[0-9A-Fa-f]{64}")) {
            usageError("argument --tls-fingerprint: '" + text
                    + "' is not a SHA-256 fingerprint (64 hexadecimal digits)");
        }
        byte[] bytes = new byte[32];
        for (int i = 0; i < 32; i++) {
            bytes[i] = (byte) Integer.parseInt(digits.substring(2 * i, 2 * i + 2), 16);
        }
        return bytes;
    }

    static String formatFingerprint(byte[] digest) {
        StringBuilder text = new StringBuilder();
        for (byte b : digest) {
            text.append(text.length() > 0 ? ":" : "").append(String.format("%02X", b & 0xff));
        }
        return text.toString();
    }

    /** The password on a file's first line, without the spaces around it. */
    static String readPassword(String path) {
        String password = "";
        try {
            List<String> lines = Files.readAllLines(Paths.get(path), StandardCharsets.UTF_8);
            password = lines.isEmpty() ? "" : lines.get(0).strip();
        } catch (IOException e) {
            usageError("argument --password-file: cannot read " + path + ": " + describe(e));
        }
        if (password.isEmpty()) {
            usageError("argument --password-file: " + path + " holds no password on its first line");
        }
        return password;
    }

    static int parsePort(String text) {
        int port = 0;
        try {
            port = Integer.parseInt(text);
        } catch (NumberFormatException e) {
            usageError("argument --port: '" + text + "' is not a whole number");
        }
        if (port < 1 || port > 65535) {
            usageError("argument --port: " + port + " is not between 1 and 65535");
        }
        return port;
    }

    static void usageError(String message) {
        System.err.println(PROG + ": error: " + message + " (see --help)");
        System.exit(2);
    }

    static int fail(String message) {
        System.err.println(PROG + ": " + message);
        return 1;
    }

    static int connectAndChat(
            String host, int port, String name, boolean timestamps, Tls tls, String password) {
        String where = (host.contains(":") ? "[" + host + "]" : host) + ":" + port;
        Socket socket = new Socket();
        try {
            socket.connect(new InetSocketAddress(host, port), CONNECT_TIMEOUT_MS);
            socket.setTcpNoDelay(true);
            if (tls != null) {
                try {
                    socket = startTls(socket, host, port, tls);
                } catch (IOException | GeneralSecurityException e) {
                    closeQuietly(socket);
                    return fail("TLS with " + where + " failed: " + describeTls(e));
                }
            }
            if (password != null) { // before run()'s !Join, as IRC's PASS comes before NICK
                socket.getOutputStream().write(
                        ("!Pass " + password + "\n").getBytes(StandardCharsets.UTF_8));
            }
            return new ChatRoomClient(socket, name, timestamps).run();
        } catch (UnknownHostException e) {
            return fail("cannot connect to " + where + ": unknown host");
        } catch (SocketTimeoutException e) {
            return fail("cannot connect to " + where + ": timed out");
        } catch (IOException e) {
            return fail("cannot connect to " + where + ": " + describe(e));
        }
    }

    /**
     * TLS over the connected socket: the handshake, within the connect timeout, with the
     * certificate checked by a CA (and the host name) or by its pinned fingerprint. Nothing is
     * sent over it before both pass.
     */
    static SSLSocket startTls(Socket plain, String host, int port, Tls tls)
            throws IOException, GeneralSecurityException {
        SSLContext context = SSLContext.getInstance("TLS");
        if (tls.fingerprint != null) {
            context.init(null, new TrustManager[] {new PinnedTrustManager(tls.fingerprint)}, null);
        } else if (tls.caFile != null) {
            KeyStore trusted = KeyStore.getInstance(KeyStore.getDefaultType());
            trusted.load(null, null);
            try (FileInputStream pem = new FileInputStream(tls.caFile)) {
                int n = 0;
                for (Certificate ca : CertificateFactory.getInstance("X.509").generateCertificates(pem)) {
                    trusted.setCertificateEntry("ca" + n++, ca);
                }
            }
            TrustManagerFactory factory =
                    TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            factory.init(trusted);
            context.init(null, factory.getTrustManagers(), null);
        } else {
            context = SSLContext.getDefault();
        }
        SSLSocket socket = (SSLSocket) context.getSocketFactory().createSocket(plain, host, port, true);
        SSLParameters parameters = socket.getSSLParameters();
        parameters.setProtocols(new String[] {"TLSv1.3", "TLSv1.2"});
        if (tls.fingerprint == null) {
            parameters.setEndpointIdentificationAlgorithm("HTTPS"); // the name must match too
        }
        socket.setSSLParameters(parameters);
        socket.setSoTimeout(CONNECT_TIMEOUT_MS);
        socket.startHandshake();
        socket.setSoTimeout(0);
        return socket;
    }

    /** Trusts exactly the server whose leaf certificate has this SHA-256, whoever signed it. */
    static final class PinnedTrustManager implements X509TrustManager {
        private final byte[] expected;

        PinnedTrustManager(byte[] expected) {
            this.expected = expected.clone();
        }

        @Override
        public void checkServerTrusted(X509Certificate[] chain, String authType)
                throws CertificateException {
            byte[] actual;
            try {
                actual = MessageDigest.getInstance("SHA-256").digest(chain[0].getEncoded());
            } catch (GeneralSecurityException e) {
                throw new CertificateException("cannot compute its SHA-256", e);
            }
            if (!MessageDigest.isEqual(actual, expected)) {
                throw new CertificateException("its certificate is not the pinned one: expected "
                        + formatFingerprint(expected) + ", the server's is " + formatFingerprint(actual));
            }
        }

        @Override
        public void checkClientTrusted(X509Certificate[] chain, String authType)
                throws CertificateException {
            throw new CertificateException("a client never checks a client");
        }

        @Override
        public X509Certificate[] getAcceptedIssuers() {
            return new X509Certificate[0];
        }
    }

    /** Why TLS failed, in a few words: the certificate check's own, when that is what failed. */
    static String describeTls(Exception e) {
        for (Throwable cause = e; cause != null; cause = cause.getCause()) {
            if (cause instanceof CertificateException) {
                String message = cause.getMessage();
                if (message != null && message.startsWith("its certificate")) {
                    return message;
                }
                if (message != null && message.toLowerCase(Locale.ROOT).contains("path")) {
                    return "certificate not trusted: no trusted CA signed it";
                }
                return "certificate not trusted: " + message;
            }
        }
        if (e instanceof SocketTimeoutException) {
            return "timed out";
        }
        if (e instanceof IOException && !(e instanceof SSLException)) {
            return describe((IOException) e);
        }
        String message = e.getMessage();
        return message == null ? e.getClass().getSimpleName() : message;
    }

    static void closeQuietly(Socket socket) {
        try {
            socket.close();
        } catch (IOException e) {
            // it is being given up anyway
        }
    }

    static String describe(IOException e) {
        String message = e.getMessage();
        if (message == null) {
            return e.getClass().getSimpleName();
        }
        // "Connection refused (Connection refused)" on some JDKs: keep the words once.
        int paren = message.indexOf(" (");
        return paren > 0 ? message.substring(0, paren) : message;
    }

    private int run() throws IOException {
        send(JOIN);
        if (name != null) {
            // Not "!Join NAME": a name taken already would keep the user out of the room.
            send("/nick " + name);
        }
        Thread receiver = new Thread(this::receiveForever, "receiver");
        // A blocked read of stdin cannot be interrupted: a daemon nobody joins.
        Thread input = new Thread(this::readInputForever, "input");
        input.setDaemon(true);
        // Never removed: removing it races the hook a signal has just started ("Shutdown in
        // progress"). After the session it is what exits, with the session's status.
        Runtime.getRuntime().addShutdownHook(new Thread(this::leaveOnSignal, "leave-on-signal"));
        receiver.start();
        input.start();
        awaitQuietly(changed, Long.MAX_VALUE);
        if (ended.getCount() > 0) {
            awaitQuietly(ended, LEAVE_TIMEOUT_MS);
        }
        stopReceiving();
        joinQuietly(receiver);
        try {
            socket.close();
        } catch (IOException e) {
            // nothing is lost: both sides are done with it, and the status below stands
        }
        exitStatus = failure == null ? 0 : fail(failure);
        finished.countDown();
        return exitStatus;
    }

    /**
     * The JVM shuts down. On Ctrl-C, SIGTERM or SIGHUP during the session: say !Quit and let
     * run() finish as after !Quit (exit 0, or 1 if the connection had already failed). After
     * run(), main's System.exit got here: exit with the same status.
     */
    private void leaveOnSignal() {
        if (finished.getCount() > 0) {
            leave();
            // run() waits LEAVE_TIMEOUT_MS at most for the goodbye, then closes: exit within 2 s.
            awaitQuietly(finished, LEAVE_TIMEOUT_MS + 500);
        }
        // halt(), not a return: after a signal the JVM would exit 128 + the signal's number.
        Runtime.getRuntime().halt(exitStatus);
    }

    private void send(String text) throws IOException {
        byte[] line = (text + "\n").getBytes(StandardCharsets.UTF_8);
        synchronized (out) { // the input thread and, on a signal, the shutdown hook send
            out.write(line);
            out.flush();
        }
    }

    private void leave() {
        if (leaving) {
            return;
        }
        leaving = true;
        try {
            send(QUIT);
        } catch (IOException e) {
            // a lost connection is the receiver's to report
        }
        changed.countDown();
    }

    private void stopReceiving() {
        try {
            socket.shutdownInput(); // wakes a receiver blocked in read(); close() might not
        } catch (IOException e) {
            // already closed: the receiver has ended
        }
    }

    private void readInputForever() {
        BufferedReader stdin =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        try {
            while (!leaving) {
                String text = stdin.readLine();
                if (text == null || text.strip().equalsIgnoreCase(QUIT)) {
                    leave();
                    return;
                }
                send(text);
            }
        } catch (IOException e) {
            // stdin or the socket failed; the receiver reports a lost connection
        }
    }

    private void receiveForever() {
        InputStream in;
        ByteArrayOutputStream line = new ByteArrayOutputStream();
        boolean tooLong = false;
        try {
            in = socket.getInputStream();
            byte[] chunk = new byte[65536];
            int n;
            while ((n = in.read(chunk)) != -1) {
                for (int i = 0; i < n; i++) {
                    byte b = chunk[i];
                    if (b == '\n') {
                        show(tooLong ? "[a line from the server over " + MAX_SERVER_LINE
                                + " bytes was cut]" : decodeLine(line.toByteArray()));
                        line.reset();
                        tooLong = false;
                    } else if (line.size() < MAX_SERVER_LINE) {
                        line.write(b);
                    } else {
                        tooLong = true;
                    }
                }
            }
            end(line.size() > 0 ? "connection lost in the middle of a line"
                    : "the server closed the connection");
        } catch (IOException e) {
            end("connection lost: " + describe(e));
        }
    }

    private void end(String why) {
        if (!leaving) {
            failure = why;
        }
        ended.countDown();
        changed.countDown();
    }

    private void show(String line) {
        String text = timestamps ? LocalTime.now().format(TIMESTAMP) + line : line;
        if (onTerminal) {
            // The terminal echoes what is typed on the cursor's row, and this process sees none
            // of it before Enter: a line break first keeps a line from gluing onto it.
            stdout.print("\r\n" + String.join("\r\n", wrap(text, columns())) + "\r\n");
        } else {
            stdout.println(text);
        }
    }

    private int columns() {
        long now = System.nanoTime();
        if (columns == 0 || now - columnsReadAt > COLUMNS_MAX_AGE_NS) {
            columns = terminalColumns();
            columnsReadAt = now;
        }
        return columns;
    }

    /** The terminal's width: $COLUMNS, else what stty says of it, else 80. */
    static int terminalColumns() {
        int fromEnvironment = positiveNumber(System.getenv("COLUMNS"));
        if (fromEnvironment > 0) {
            return fromEnvironment;
        }
        int fromStty = sttyColumns();
        return fromStty > 0 ? fromStty : DEFAULT_COLUMNS;
    }

    /**
     * The width stty reports for the terminal, or 0 if it cannot tell. It is asked about our
     * stdin, the terminal (see isTerminal), rather than /dev/tty: a process can have a terminal
     * on stdin and stdout and no controlling terminal at all.
     */
    static int sttyColumns() {
        try {
            Process stty = new ProcessBuilder("stty", "size")
                    .redirectInput(ProcessBuilder.Redirect.INHERIT)
                    .redirectError(ProcessBuilder.Redirect.DISCARD)
                    .start();
            // "ROWS COLUMNS"; "0 0" from a terminal that was never given a size
            String[] size = new String(stty.getInputStream().readAllBytes(),
                    StandardCharsets.US_ASCII).strip().split(" ");
            return stty.waitFor() == 0 && size.length == 2 ? positiveNumber(size[1]) : 0;
        } catch (IOException e) {
            return 0; // no stty to run
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return 0;
        }
    }

    /** The text as a whole number above 0, or 0 if it is none. */
    static int positiveNumber(String text) {
        try {
            return text == null ? 0 : Math.max(0, Integer.parseInt(text.strip()));
        } catch (NumberFormatException e) {
            return 0;
        }
    }

    /**
     * The text in rows of at most width columns, every row after the first starting with
     * CONTINUATION_INDENT. Each row takes at least one character, however narrow the terminal.
     */
    static List<String> wrap(String text, int width) {
        List<String> rows = new ArrayList<>();
        StringBuilder row = new StringBuilder();
        int used = 0; // columns the row takes so far
        int i = 0;
        while (i < text.length()) {
            int codePoint = text.codePointAt(i);
            i += Character.charCount(codePoint);
            int wide = columnsOf(codePoint);
            if (row.length() > 0 && used + wide > width) { // a row takes one character at least
                rows.add(row.toString());
                row.setLength(0);
                row.append(CONTINUATION_INDENT);
                used = CONTINUATION_INDENT.length();
            }
            row.appendCodePoint(codePoint);
            used += wide;
        }
        rows.add(row.toString());
        return rows;
    }

    /** Columns a terminal gives the character: 2 if East Asian wide (see WIDE), else 1. */
    static int columnsOf(int codePoint) {
        for (int i = 0; i < WIDE.length && codePoint >= WIDE[i]; i += 2) {
            if (codePoint <= WIDE[i + 1]) {
                return 2;
            }
        }
        return 1;
    }

    /** True if stdin and stdout are a terminal (System.console() says so before Java 22). */
    static boolean isTerminal() {
        Console console = System.console();
        if (console == null) {
            return false;
        }
        try {
            // Java 22 gives a console on pipes too, and Console.isTerminal() to tell them apart.
            return (Boolean) Console.class.getMethod("isTerminal").invoke(console);
        } catch (NoSuchMethodException e) {
            return true;
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException("Console.isTerminal() is public and takes nothing", e);
        }
    }

    /** A line's text: invalid UTF-8 as U+FFFD, a final "\r" dropped, then made safe. */
    static String decodeLine(byte[] bytes) {
        int length = bytes.length;
        if (length > 0 && bytes[length - 1] == '\r') {
            length--;
        }
        CharsetDecoder decoder = StandardCharsets.UTF_8.newDecoder()
                .onMalformedInput(CodingErrorAction.REPLACE)
                .onUnmappableCharacter(CodingErrorAction.REPLACE);
        try {
            return sanitize(decoder.decode(ByteBuffer.wrap(bytes, 0, length)).toString());
        } catch (CharacterCodingException e) {
            throw new IllegalStateException("a replacing decoder cannot fail", e);
        }
    }

    /** Replaces C0 and C1 controls, DEL, the line and paragraph separators and the bidi
     * controls with U+FFFD, a tab with a space: the rule of PROTOCOL.md's "Safe text". */
    static String sanitize(String text) {
        StringBuilder safe = new StringBuilder(text.length());
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c == '\t') {
                safe.append(' ');
            } else if (c < 0x20 || (c >= 0x7f && c < 0xa0) || c == '\u2028' || c == '\u2029'
                    || BIDI_CONTROLS.indexOf(c) >= 0) {
                safe.append('\ufffd');
            } else {
                safe.append(c);
            }
        }
        return safe.toString();
    }

    static void awaitQuietly(CountDownLatch latch, long millis) {
        try {
            latch.await(millis, TimeUnit.MILLISECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    static void joinQuietly(Thread thread) {
        try {
            thread.join();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
